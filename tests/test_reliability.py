"""Must-show: every bad input is named (file + problem, one line, never a traceback) by emi_check, the loader and
emi_train before a long run; quarantine skips it and says which; a run is not lost to one bad file; emi_predict says
when an input has little or no speech, shown on real recordings from Debian's test packages (`make sounds`)."""
import json, os, shutil
from pathlib import Path
import numpy as np, pandas as pd, pytest, soundfile as sf, soxr
from conftest import run_cli, clean, copy_root as _copy, first_fid as _fid
from emi_nb.config import EMOTIONS, SR, make_config
from emi_nb.data import DataError, EMIDataset, check_root, load_audio, out_len
from emi_nb.synth import build_corpus
from emi_nb.train import run_data, build_model, write_weights

ENV = dict(os.environ, OMP_NUM_THREADS='1', EMI_PROGRESS='off')
LIBRIVOX = Path('/usr/share/pocketsphinx/test/data/librivox')   # pocketsphinx-testdata: read speech, 16 kHz
ALSA = Path('/usr/share/sounds/alsa')                           # alsa-utils: spoken words and a noise, 48 kHz


def _set(root, csv, i, col, value):
    "Set one cell (0-based data row i) of a CSV, as text."
    p = root/csv; df = pd.read_csv(p, dtype=str, keep_default_na=False); df.loc[i, col] = value; df.to_csv(p, index=False)

def _check(root, *args):
    r = run_cli('emi_check', '--data-root', root, '--decode-workers', 2, *args, check=False, env=ENV)
    return r.returncode, r.stdout + r.stderr

def _train(root, run_dir, *extra):
    r = run_cli('emi_train', '--profile', 'smoke', '--backbone', 'preset:tiny', '--device', 'cpu', '--quiet',
                '--data-root', root, '--run-dir', run_dir, *extra, check=False, env=ENV)
    return r.returncode, r.stdout + r.stderr

def _has(out, *frags) -> bool: return any(all(f in l for f in frags) for l in out.splitlines())

def _clean_exit(code, out, want):
    assert code == want and 'Traceback' not in out, f"exit {code} (want {want})\n{out[-3000:]}"

# Each break edits a copy of the smoke corpus and returns (a fragment of the file, the problem) that must be named.
def _huge_id(r):
    _set(r, 'train_split.csv', 5, 'Filename', '99999999999999999999')
    return 'train_split.csv', "row 7: Filename '99999999999999999999' is too large for a clip id (more than 18 digits)"
def _superscript_id(r):
    _set(r, 'train_split.csv', 5, 'Filename', '³'); return 'train_split.csv', "row 7: Filename '³' is not a non-negative integer id"
def _clip_10ms(r):
    f = _fid(r, 'train', 3); (r/f'audio/{f:05d}.mp3').unlink()
    sf.write(r/f'audio/{f:05d}.wav', 0.3 * np.sin(np.arange(160) / 3), SR)
    return f'{f:05d}.wav', 'too short: 160 samples at 16 kHz (10 ms); the model needs at least 400 (25 ms)'
def _two_files(r):
    f = _fid(r, 'train', 3); y, _ = load_audio(r/f'audio/{f:05d}.mp3', None); sf.write(r/f'audio/{f:05d}.wav', y, SR)
    return f'{f:05d}.mp3', f'2 audio files for id {f}: {f:05d}.mp3 and {f:05d}.wav'
def _broken_link(r):
    f = _fid(r, 'train', 3); (r/f'audio/{f:05d}.mp3').unlink(); (r/f'audio/{f:05d}.mp3').symlink_to(r/'audio/moved-away.mp3')
    return f'{f:05d}.mp3', 'broken symlink'

CLIP_CASES = {'Filename 99999999999999999999': _huge_id, 'Filename ³': _superscript_id, '10 ms clip': _clip_10ms,
              '00003.mp3 and 00003.wav': _two_files, 'broken symlink': _broken_link}

@pytest.mark.parametrize('case', list(CLIP_CASES))
def test_bad_input_named_everywhere(clean, tmp_path, case):
    "emi_check, the strict loader and emi_train name the file and the problem; quarantine skips exactly that row/clip."
    r = _copy(clean, tmp_path); where, why = CLIP_CASES[case](r)
    code, out = _check(r)
    _clean_exit(code, out, 1); assert _has(out, 'error', where, why), out
    with pytest.raises(DataError) as e: EMIDataset(r, 'train')
    assert where in e.value.path and why in e.value.reason, str(e.value)
    q = EMIDataset(r, 'train', quarantine=True)
    assert len(q) == 31 and len(q.report) == 1, q.report
    assert where in q.report[0]['file'] and why in q.report[0]['problem'] and q.report[0]['action'] == 'skipped'
    code, out = _train(r, tmp_path/'run')
    _clean_exit(code, out, 2); assert _has(out, 'emi_train: ', where, why), out

def test_missing_audio_folder(clean, tmp_path):
    "No audio/ and no raw/ videos at all: one named error, not 64 missing files; with quarantine a DataError, not an AssertionError."
    r = _copy(clean, tmp_path); shutil.rmtree(r/'audio'); shutil.rmtree(r/'raw')
    code, out = _check(r)
    _clean_exit(code, out, 1); assert _has(out, 'error', 'audio', 'missing folder: the audio of every clip lives here'), out
    assert 'missing file' not in out
    with pytest.raises(DataError, match='audio: missing folder'): EMIDataset(r, 'train', quarantine=True)
    code, out = _train(r, tmp_path/'run', '--quarantine', 'true')
    _clean_exit(code, out, 2); assert _has(out, 'emi_train: ', '/audio: missing folder'), out

def test_every_clip_quarantined_is_an_error(clean, tmp_path):
    r = _copy(clean, tmp_path)
    for f in pd.read_csv(r/'train_split.csv').Filename: (r/f'audio/{f:05d}.mp3').write_bytes(b'')
    with pytest.raises(DataError, match=r'train_split.csv: no usable clip: all 32 quarantined \(\d+\.mp3: empty file'):
        EMIDataset(r, 'train', quarantine=True)

def test_shared_ids_refused_in_training(clean, tmp_path):
    "The same id in train and valid: emi_check and emi_train both name it; training needs allow_shared_ids to go on."
    r = _copy(clean, tmp_path); f = _fid(r, 'train', 4); _set(r, 'valid_split.csv', 0, 'Filename', str(f))
    why = f'row 2, Filename {f}: id {f} is also in train (train_split.csv row 6): splits must not share clips'
    code, out = _check(r)
    _clean_exit(code, out, 1); assert _has(out, 'error', 'valid_split.csv', why), out
    code, out = _train(r, tmp_path/'run')
    _clean_exit(code, out, 2); assert _has(out, 'emi_train: ', 'valid_split.csv', why, 'allow_shared_ids=True'), out
    cfg = make_config('smoke', data_root=str(r), run_dir=str(tmp_path/'run'), quarantine=True)
    with pytest.raises(DataError, match='is also in train'): run_data(cfg, r)   # quarantine does not hide leakage
    with pytest.warns(UserWarning, match='kept as allow_shared_ids=True'): d = run_data(cfg, r, allow_shared_ids=True)
    rows = pd.read_csv(d['quarantine']['path'])
    assert rows.action.tolist() == ['kept (allow_shared_ids)'] and why in rows.problem[0]

def _nan_label(r):
    f = _fid(r, 'test', 1); _set(r, 'test_labels.csv', 1, 'Joy', 'nan'); return f"row 3, Filename {f}: Joy = 'nan' is not a finite number"
def _text_label(r):
    f = _fid(r, 'test', 1); _set(r, 'test_labels.csv', 1, 'Joy', 'high'); return f"row 3, Filename {f}: Joy = 'high' is not a finite number"
def _missing_row(r):
    f = _fid(r, 'test', 1); p = r/'test_labels.csv'; df = pd.read_csv(p, dtype=str); df[df.Filename != str(f)].to_csv(p, index=False)
    return f'no row for test id {f} (it is in test_split.csv)'

@pytest.mark.parametrize('brk', [_nan_label, _text_label, _missing_row], ids=['NaN', 'text', 'missing row'])
def test_test_labels_validated(clean, tmp_path, brk):
    "test_labels.csv is checked like a split before training: named in strict mode, left out of the score with quarantine."
    r = _copy(clean, tmp_path); why = brk(r)
    code, out = _check(r)
    _clean_exit(code, out, 1); assert _has(out, 'error', 'test_labels.csv', why), out
    cfg = make_config('smoke', data_root=str(r), run_dir=str(tmp_path/'run'))
    with pytest.raises(DataError) as e: run_data(cfg, r)
    assert e.value.path.endswith('test_labels.csv') and why in e.value.reason
    d = run_data(cfg.replace(quarantine=True), r)
    assert len(d['test_labels']) == 15 and d['quarantine']['count'] == 1
    row = pd.read_csv(d['quarantine']['path']).iloc[0]
    assert (row.split, row.action, row.file.endswith('test_labels.csv'), why in row.problem) == ('test', 'not scored', True, True)

def test_quarantine_run_reports_which(clean, tmp_path):
    """A quarantined training run finishes; the report in the run folder lists each skipped row/clip (file, split,
    problem, action), the output prints them, and the results JSON links and counts it."""
    r = _copy(clean, tmp_path)
    expected = [_superscript_id(r), _clip_10ms(r), ('test_labels.csv', _nan_label(r))]
    fv = _fid(r, 'valid', 2); y, _ = load_audio(r/f'audio/{fv:05d}.mp3', None); sf.write(r/f'audio/{fv:05d}.wav', y, SR)
    expected.append((f'{fv:05d}.mp3', f'2 audio files for id {fv}'))
    code, out = _train(r, tmp_path/'run', '--quarantine', 'true', '--epochs', '1', '--max-steps', '1')
    _clean_exit(code, out, 0)
    res = json.loads((tmp_path/'run/results/emi.json').read_text())
    q = res['quarantine']; rep = pd.read_csv(q['path'])
    assert q['count'] == 4 and Path(q['path']) == tmp_path/'run/results/emi_quarantine.csv', q
    assert list(rep.columns[:4]) == ['file', 'split', 'problem', 'action'], rep.columns
    for where, why in expected:
        assert ((rep.file.str.contains(where, regex=False)) & rep.problem.str.contains(why, regex=False)).sum() == 1, (where, why, rep)
        assert _has(out, where, why), f"not printed: {where}: {why}\n{out}"
    assert sorted(rep.split) == ['test', 'train', 'train', 'valid'] and res['metrics']['test']['n'] == 15
    assert 'quarantine: 4 row(s)/clip(s) left out' in out

def test_broken_symlink_does_not_lose_the_run(clean, tmp_path):
    r = _copy(clean, tmp_path); where, why = _broken_link(r)
    code, out = _train(r, tmp_path/'run', '--quarantine', 'true', '--epochs', '1', '--max-steps', '1')
    rep = pd.read_csv(tmp_path/'run/results/emi_quarantine.csv')
    assert rep.file.str.endswith(where).any() and (rep.problem == why).any(), rep
    _clean_exit(code, out, 0)
    assert json.loads((tmp_path/'run/results/emi.json').read_text())['quarantine']['count'] == 1

@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
    "A checkpoint folder of the tiny model with random weights (prediction paths only)."
    d = tmp_path_factory.mktemp('ckpt'); cfg = make_config('smoke', backbone='preset:tiny', device='cpu')
    write_weights(d, build_model(cfg, 'preset:tiny', 'cpu'), cfg, name='random')
    return d

def test_truncated_checkpoint_named(checkpoint, tmp_path):
    d = tmp_path/'ck'; shutil.copytree(checkpoint, d); w = d/'model.safetensors'; w.write_bytes(w.read_bytes()[:w.stat().st_size // 2])
    sf.write(tmp_path/'a.wav', 0.1 * np.sin(np.arange(SR) / 5), SR)
    r = run_cli('emi_predict', '--checkpoint', d, tmp_path/'a.wav', '--output', tmp_path/'p.csv', check=False, env=ENV)
    _clean_exit(r.returncode, r.stdout + r.stderr, 2)
    assert r.stderr.startswith(f'emi_predict: {w}: damaged') and r.stderr.count('\n') == 1, r.stderr

def _need_sounds():
    if not (LIBRIVOX.is_dir() and (ALSA/'Noise.wav').exists()):
        pytest.fail("Debian's test recordings are missing: `make sounds` installs pocketsphinx-testdata and alsa-utils")

def _noise(kind:str, seconds:float=5.0, seed:int=0) -> np.ndarray:
    "White or pink (1/f power) noise at 16 kHz, RMS 0.1."
    rng = np.random.default_rng(seed); n = int(seconds * SR)
    if kind == 'white': x = rng.standard_normal(n)
    else:
        f = np.fft.rfftfreq(n, 1 / SR); s = rng.standard_normal(len(f)) + 1j * rng.standard_normal(len(f))
        s[1:] /= np.sqrt(f[1:]); s[0] = 0; x = np.fft.irfft(s, n)
    return (0.1 * x / x.std()).astype(np.float32)

def test_predict_flags_noise_not_speech(checkpoint, tmp_path):
    "emi_predict on real speech (LibriVox 16 kHz, spoken words 48 kHz) plus noise: the noise rows are flagged, the speech rows not."
    _need_sounds()
    d = tmp_path/'in'; d.mkdir()
    speech = sorted(LIBRIVOX.glob('*.wav')) + [ALSA/f'{n}.wav' for n in ('Front_Center', 'Front_Left', 'Rear_Right', 'Side_Left')]
    for f in speech: shutil.copy(f, d/f.name)
    shutil.copy(ALSA/'Noise.wav', d/'alsa_Noise.wav')
    sf.write(d/'white_noise.wav', _noise('white'), SR); sf.write(d/'pink_noise.flac', _noise('pink'), SR)
    out = tmp_path/'preds.csv'
    r = run_cli('emi_predict', '--checkpoint', checkpoint, d, '--output', out, check=False, env=ENV)
    _clean_exit(r.returncode, r.stdout + r.stderr, 0)
    df = pd.read_csv(out).set_index('Filename')
    print(df[['seconds', 'speech_share', 'little_speech']].to_string())
    noise = ['alsa_Noise', 'white_noise', 'pink_noise']
    assert df.little_speech.to_dict() == {n: n in noise for n in df.index}
    assert df.loc[noise, 'speech_share'].max() < 0.05 and df.drop(noise).speech_share.min() > 0.5
    flagged = [l for l in r.stderr.splitlines() if 'LITTLE SPEECH' in l]
    assert sorted(Path(l.split('LITTLE SPEECH ')[1].split(':')[0]).stem for l in flagged) == sorted(noise), r.stderr
    assert '3 with little speech' in r.stdout
    assert df[EMOTIONS].notna().all().all()

def test_real_48k_speech_through_the_loader_and_emi_check(tmp_path):
    """Real recordings as an ABAW root: 48 kHz spoken words resample to the right length, emi_check warns on the rate
    and measures them as speech."""
    _need_sounds()
    r = tmp_path/'real'; (r/'audio').mkdir(parents=True)
    files = {1 + i: f for i, f in enumerate(sorted(ALSA.glob('*_*.wav')) + sorted(LIBRIVOX.glob('*.wav')))}
    for fid, f in files.items(): shutil.copy(f, r/f'audio/{fid:05d}.wav')
    lab = pd.DataFrame(np.random.default_rng(0).uniform(0, 1, (len(files), 6)).round(3), columns=EMOTIONS)
    lab.insert(0, 'Filename', list(files)); lab[:8].to_csv(r/'train_split.csv', index=False); lab[8:].to_csv(r/'valid_split.csv', index=False)
    ds = EMIDataset(r, 'train', max_seconds=None)
    for i, fid in enumerate(ds.fids):
        info = sf.info(str(files[fid])); assert info.samplerate == 48000
        item = ds[i]; assert len(item['wav']) == ds.lengths[i] == out_len(info.frames, 48000)
        y, _ = load_audio(files[fid], None)
        ref = soxr.resample(sf.read(str(files[fid]), dtype='float32')[0], 48000, SR, 'HQ')
        assert np.abs(y - ref[:len(y)]).max() < 1e-5 and item['wav'].std() > 0.9
    rep = check_root(r, workers=2)
    warn = rep['problems'][rep['problems'].severity == 'warning']
    assert (warn.problem.str.contains('1 channel(s) at 48000 Hz', regex=False)).sum() == 8 and (rep['problems'].severity == 'error').sum() == 0
    sp = rep['summary']['speech']; print(sp)
    assert sp['measured'] == len(files) and sp['below_little_speech'] == 0 and sp['min'] > 0.5
