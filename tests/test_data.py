"""Must-show 2: broken copies of the smoke corpus; emi_check and the loader name every problem; nothing loads as zeros.
The release's own form (raw/*.mp4 with the sound inside) checks, trains and predicts; a strict run stops before its
first step."""
import json, os, shutil, subprocess
from pathlib import Path
import numpy as np, pandas as pd, pytest, soundfile as sf, soxr, torch
from conftest import run_cli, clean, copy_root as _copy, first_fid as _fid
from emi_nb.config import EMOTIONS, SR
from emi_nb.data import DataError, EMIDataset, load_audio, read_split, check_root, collate, video_info, face_frames, load_pickled_features
from emi_nb.synth import build_corpus

ENV = dict(os.environ, OMP_NUM_THREADS='1', EMI_PROGRESS='off')
TINY = ('--profile', 'smoke', '--backbone', 'preset:tiny', '--device', 'cpu')


def _edit_csv(root, split, fn):
    "Rewrite a split CSV through `fn(df)` (in place edits, or a returned new frame)."
    p = root/f'{split}_split.csv'; df = pd.read_csv(p, dtype=str, keep_default_na=False); new = fn(df)
    (df if new is None else new).to_csv(p, index=False)

def _stereo44k(root, fid):
    "Replace a clip's mp3 by a stereo 44.1 kHz wav whose channel mean is the original signal."
    y, _ = load_audio(root/f'audio/{fid:05d}.mp3', None)
    z = soxr.resample(y, SR, 44100, 'HQ'); (root/f'audio/{fid:05d}.mp3').unlink()
    sf.write(root/f'audio/{fid:05d}.wav', np.stack([1.2 * z, 0.8 * z], 1), 44100, subtype='FLOAT')
    return y

# each break edits a copy and returns (a fragment of the path, a fragment of the reason) that must be reported
def _missing(r, i=0):
    f = _fid(r, 'train', i); (r/f'audio/{f:05d}.mp3').unlink(); return f'{f:05d}.mp3', 'missing file'
def _empty(r, i=0):
    f = _fid(r, 'train', i); (r/f'audio/{f:05d}.mp3').write_bytes(b''); return f'{f:05d}.mp3', 'empty file (0 bytes)'
def _corrupt(r, i=0):
    f = _fid(r, 'train', i); (r/f'audio/{f:05d}.mp3').write_bytes(np.random.default_rng(0).bytes(20000)); return f'{f:05d}.mp3', 'cannot decode'
def _truncated(r, i=1):
    f = _fid(r, 'train', i); p = r/f'audio/{f:05d}.mp3'; b = p.read_bytes(); p.write_bytes(b[:len(b) // 4]); return f'{f:05d}.mp3', 'truncated or corrupt'
def _escape(r, i=0):
    f = _fid(r, 'train', i); out = r.parent/f'elsewhere{i}.mp3'; shutil.move(r/f'audio/{f:05d}.mp3', out); (r/f'audio/{f:05d}.mp3').symlink_to(out)
    return f'{f:05d}.mp3', 'path escapes the data folder'
def _nan(r, split='train'):
    f = _fid(r, split, 2); _edit_csv(r, split, lambda d: d.__setitem__('Joy', d['Joy'].where(d.index != 2, 'nan')))
    return f'{split}_split.csv', f"row 4, Filename {f}: Joy = 'nan' is not a finite number"
def _big(r, split='train'):
    f = _fid(r, split, 0); _edit_csv(r, split, lambda d: d.__setitem__('Amusement', d['Amusement'].where(d.index != 0, '1.7')))
    return f'{split}_split.csv', f'row 2, Filename {f}: Amusement = 1.7 is outside [0, 1]'
def _dup(r, split='train'):
    f = _fid(r, split, 1); _edit_csv(r, split, lambda d: d.__setitem__('Filename', d['Filename'].where(d.index != 3, d['Filename'][1])))
    return f'{split}_split.csv', f'row 3, Filename {f}: duplicate id'
def _nonnum(r, split='train'):
    _edit_csv(r, split, lambda d: d.__setitem__('Filename', d['Filename'].where(d.index != 5, 'a17'))); return f'{split}_split.csv', "row 7: Filename 'a17' is not a non-negative integer id"
def _nocol(r, split='train'):
    _edit_csv(r, split, lambda d: d.drop(columns=['Determination'])); return f'{split}_split.csv', "missing column(s) ['Determination']"
def _nosplit(r, split='train'):
    (r/f'{split}_split.csv').write_text('Filename,' + ','.join(EMOTIONS) + '\n'); return f'{split}_split.csv', 'empty split'

CASES = {'missing file': (_missing, 'clip'), '0-byte file': (_empty, 'clip'), 'corrupt mp3': (_corrupt, 'clip'),
         'truncated mp3': (_truncated, 'clip'), 'path escaping the data root': (_escape, 'clip'), 'NaN label': (_nan, 'row'),
         'label 1.7': (_big, 'row'), 'duplicate id': (_dup, 'row'), 'non-numeric id': (_nonnum, 'row'),
         'missing column': (_nocol, 'table'), 'empty split': (_nosplit, 'table')}

@pytest.mark.parametrize('case', list(CASES))
def test_loader_names_each_problem(clean, tmp_path, case):
    "Strict loading raises a DataError naming the file and reason; quarantine drops only the bad row/clip and lists it."
    r = _copy(clean, tmp_path); brk, level = CASES[case]
    where, why = brk(r)
    with pytest.raises(DataError) as e: EMIDataset(r, 'train')   # every clip is decoded up front, before any item is read
    assert where in e.value.path and why in e.value.reason, str(e.value)
    if level == 'table':
        with pytest.raises(DataError, match='train_split.csv'): EMIDataset(r, 'train', quarantine=True)
        return
    q = EMIDataset(r, 'train', quarantine=True)
    n = len(pd.read_csv(clean/'train_split.csv'))
    n_bad = 2 if case == 'duplicate id' else 1   # both copies of a duplicated id are dropped
    assert len(q) == n - n_bad and len(q.report) == n_bad, (case, len(q), q.report)
    assert where in q.report[0]['file'] and why in q.report[0]['problem'] and q.report[0]['action'] == 'skipped'
    for i in range(len(q)):   # nothing that loads is silence or a zero-filled stand-in
        y, _ = load_audio(r/f'audio/{q.fids[i]:05d}.mp3', q.max_seconds)
        assert np.abs(y).max() > 1e-3 and q[i]['wav'].abs().max() > 0

def _emi_check(root, *args):
    r = run_cli('emi_check', '--data-root', root, '--decode-workers', 2, *args, check=False)
    return r.returncode, r.stdout + r.stderr

def test_emi_check_names_every_problem(clean, tmp_path):
    "One copy with every clip- and row-level break at once: emi_check lists each with its file, warns on stereo 44.1 kHz, exits 1."
    r = _copy(clean, tmp_path)
    expected = [_missing(r, 0), _empty(r, 1), _corrupt(r, 2), _escape(r, 3), _truncated(r, 4)]
    expected += [f(r, 'valid') for f in (_nan, _big, _dup, _nonnum)]
    stereo = _fid(r, 'valid', 4); _stereo44k(r, stereo)   # row 4 is untouched by the row breaks
    code, out = _emi_check(r, '--output', tmp_path/'report.json')
    print(out)
    assert code == 1, out
    for where, why in expected:
        assert any(where in l and why in l and l.startswith('error') for l in out.splitlines()), f"not reported: {where}: {why}\n{out}"
    assert any(f'{stereo:05d}.wav' in l and l.startswith('warning') and '44100 Hz' in l for l in out.splitlines()), out
    rep = json.loads((tmp_path/'report.json').read_text())
    n_err = len(expected) + 1   # a duplicate id makes both of its rows bad
    assert sum(p['severity'] == 'error' for p in rep['problems']) == n_err
    assert f'emi_check: {n_err} error(s), 1 warning(s)' in out

def test_emi_check_structural_problems(clean, tmp_path):
    r = _copy(clean, tmp_path)
    _nocol(r); (r/'valid_split.csv').write_text('Filename,' + ','.join(EMOTIONS) + '\n'); (r/'test_split.csv').unlink()
    code, out = _emi_check(r)
    assert code == 1
    assert any('train_split.csv' in l and "missing column(s) ['Determination']" in l for l in out.splitlines()), out
    assert any('valid_split.csv' in l and 'empty split' in l for l in out.splitlines()), out
    assert any('test_split.csv' in l and 'warning' in l for l in out.splitlines()), out

def test_emi_check_clean_corpus_passes(clean, tmp_path):
    code, out = _emi_check(clean, '--output', tmp_path/'r.json')
    assert code == 0 and '0 error(s), 0 warning(s)' in out, out
    s = json.loads((tmp_path/'r.json').read_text())['summary']
    assert s['decoded'] == 64 and s['formats'] == {'1 ch @ 16000 Hz': 64} and s['share_under_1s'] > 0
    sp = s['speech']; print(sp)   # what silero-vad makes of the generated speech-like audio, whatever it is
    assert sp['measured'] == sp['of'] == 64 and 0 <= sp['min'] <= sp['median'] <= sp['max'] <= 1
    assert 'speech (silero-vad, first 12 s of each clip): 64 of 64 clips measured' in out
    code, out = _emi_check(clean, '--speech-sample', 10, '--output', tmp_path/'r10.json')
    assert code == 0 and json.loads((tmp_path/'r10.json').read_text())['summary']['speech']['measured'] == 10, out

def test_stereo_44k_loads_correctly(clean, tmp_path):
    "A stereo 44.1 kHz wav is down-mixed and resampled: the same signal as the mono 16 kHz original, not zeros."
    r = _copy(clean, tmp_path); f = _fid(r); y0 = _stereo44k(r, f)
    y, info = load_audio(r/f'audio/{f:05d}.wav', None)
    assert (info['channels'], info['orig_sr']) == (2, 44100) and abs(len(y) - len(y0)) <= 1
    n = min(len(y), len(y0)); assert np.corrcoef(y[:n], y0[:n])[0, 1] > 0.99 and np.abs(y[:n] - y0[:n]).max() < 0.02
    ds = EMIDataset(r, 'train', max_seconds=6.0); i = ds.fids.index(f)
    assert len(ds[i]['wav']) == ds.lengths[i] and ds[i]['wav'].std() > 0.5

def test_dataset_lengths_labels_and_collate(clean):
    ds = EMIDataset(clean, 'train', max_seconds=6.0)
    assert ds.labels.shape == (32, 6) and len(ds.report) == 0
    for i in range(len(ds)): assert len(ds[i]['wav']) == ds.lengths[i] <= 6 * SR
    b = collate([ds[i] for i in range(4)])
    assert b['input_values'].shape == (4, int(ds.lengths[:4].max())) and b['attention_mask'].sum(1).tolist() == ds.lengths[:4].tolist()
    test = EMIDataset(clean, 'test', labels=False); assert test.labels is None and 'labels' not in test[0]
    with pytest.raises(DataError, match='missing column'): EMIDataset(clean, 'test', labels=True)

def test_video_and_faces(clean):
    m = pd.read_csv(clean/'SYNTHETIC_clips.csv')
    for r in m.head(8).itertuples():
        vi = video_info(clean/f'raw/{r.Filename:05d}.mp4'); assert vi['frames'] == r.video_frames and abs(vi['duration'] - r.duration) < 0.1
        fr = face_frames(clean, r.Filename); assert len(fr) == r.face_frames
        assert [int(p.stem) for p in fr] == sorted(int(p.stem) for p in fr)

def test_pickles_need_opt_in(tmp_path):
    import pickle
    p = tmp_path/'00001.pkl'; p.write_bytes(pickle.dumps(np.ones((3, 4))))
    with pytest.raises(DataError, match='allow_pickle=True'): load_pickled_features(p)
    assert load_pickled_features(p, allow_pickle=True).shape == (3, 4)

def test_normalize_matches_wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor
    from emi_nb.data import normalize
    w = np.random.default_rng(0).standard_normal(4000).astype(np.float32) * 3 + 1
    fe = Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    assert np.abs(fe(w, sampling_rate=SR)['input_values'][0] - normalize(w)).max() < 1e-5

def _ffmpeg() -> str:
    exe = shutil.which('ffmpeg')
    if not exe: pytest.fail("the ffmpeg program is missing: `make ffmpeg` installs Debian's")
    return exe

def _ffmpeg_16k(path) -> np.ndarray:
    "What the reference code's createmp3.sh hands its mp3 encoder: ffmpeg -ac 1 -ar 16000, as float32."
    cmd = [_ffmpeg(), '-v', 'error', '-i', str(path), '-ac', '1', '-ar', '16000', '-f', 'f32le', '-']
    return np.frombuffer(subprocess.run(cmd, capture_output=True, check=True).stdout, np.float32)

ENCODE = {'stereo 48 kHz aac mp4': ('x.mp4', '-c:a', 'aac'), 'mono 44.1 kHz aac mkv': ('x.mkv', '-c:a', 'aac', '-ac', '1', '-ar', '44100'),
          'stereo opus webm': ('x.webm', '-c:a', 'libopus')}

@pytest.mark.parametrize('kind', ['corpus mp4', *ENCODE])
def test_container_audio_equals_ffmpeg(clean, tmp_path, kind):
    "load_audio of a container's audio track equals ffmpeg -ac 1 -ar 16000 within 1e-4 (max abs), the tolerance 04_data states."
    if kind == 'corpus mp4': p = clean/f'raw/{_fid(clean):05d}.mp4'
    else:
        t = np.arange(int(2.5 * 48000)) / 48000
        sf.write(tmp_path/'src.wav', np.stack([0.4 * np.sin(2 * np.pi * 220 * t), 0.2 * np.sin(2 * np.pi * 3000 * t)], 1), 48000)
        name, *args = ENCODE[kind]; p = tmp_path/name
        subprocess.run([_ffmpeg(), '-v', 'error', '-i', str(tmp_path/'src.wav'), *args, str(p)], check=True)
    y, info = load_audio(p, None); z = _ffmpeg_16k(p)
    print(kind, len(y), float(np.abs(y - z).max()) if len(y) == len(z) else None)
    assert info['decoder'] == 'pyav' and len(y) == len(z) and np.abs(z).max() > 0.1, (len(y), len(z))
    assert np.abs(y - z).max() <= 1e-4

def _release_form(clean, tmp_path) -> Path:
    "A copy of the corpus as the release ships it: raw/*.mp4 with the sound inside and the split CSVs, nothing else."
    r = tmp_path/'release'; shutil.copytree(clean/'raw', r/'raw')
    for s in ('train', 'valid', 'test'): shutil.copy(clean/f'{s}_split.csv', r)
    return r

def test_release_form_root_checks_trains_and_predicts(clean, tmp_path):
    "Must-show: raw/*.mp4 + CSVs, no audio/: emi_check passes, emi_train (smoke) trains from the mp4s alone, emi_predict reads them."
    r = _release_form(clean, tmp_path)
    code, out = _emi_check(r, '--speech-sample', 0, '--output', tmp_path/'c.json')
    assert code == 0 and '0 error(s)' in out and 'audio of test, train, valid from raw/*.mp4' in out, out
    d = json.loads((tmp_path/'c.json').read_text())['summary']['decoding']
    assert (d['source'], d['clips']) == ('raw', 64) and d['paper_minutes'] > 0
    run = tmp_path/'run'
    t = run_cli('emi_train', *TINY, '--data-root', r, '--run-dir', run, '--epochs', 1, '--max-steps', 2, env=ENV)
    assert 'audio      train, valid, test from raw/*.mp4' in t.stdout, t.stdout
    res = json.loads((run/'results/emi.json').read_text())
    assert res['quarantine']['sources'] == dict(train='raw', valid='raw', test='raw')
    assert res['metrics']['epochs_run'] == 1 and len(pd.read_csv(run/'results/emi_test_submission.csv')) == 16
    run_cli('emi_predict', '--checkpoint', run/'checkpoints/emi', r/'raw', '--output', tmp_path/'p.csv', '--speech-check', 'false', env=ENV)
    df = pd.read_csv(tmp_path/'p.csv', dtype={'Filename': str})
    assert len(df) == 64 and df.path.str.endswith('.mp4').all() and df[EMOTIONS].notna().all().all()

@pytest.mark.parametrize('seed,row', [(1, 0), (2, 31)])
def test_strict_run_with_an_all_zero_clip_stops_before_any_step(clean, tmp_path, seed, row):
    """Must-show: one clip whose header is valid and whose samples are all zero: emi_train exits 2 naming it, and no step
    ran (no checkpoint or state, no progress of an epoch), whatever the batch order (two seeds, first or last row)."""
    r = _copy(clean, tmp_path); f = _fid(r, 'train', row); p = r/f'audio/{f:05d}.mp3'
    n = sf.info(str(p)).frames; sf.write(p, np.zeros(n, np.float32), SR, format='MP3'); assert sf.info(str(p)).frames == n
    run = tmp_path/'run'
    t = run_cli('emi_train', *TINY, '--data-root', r, '--run-dir', run, '--seed', seed, '--epochs', 2, '--ckpt-steps', 1,
                '--progress', 'log', check=False, env=ENV)
    out = t.stdout + t.stderr
    assert t.returncode == 2 and f'emi_train: {p}: digital silence: every sample is zero' in out and 'Traceback' not in out, out
    assert not [q for q in run.rglob('*') if q.is_file()] and 'emi 1/2' not in out, out

def test_clip_checks_cached_by_file_identity(clean, tmp_path):
    "A rerun decodes nothing; a file whose bytes, size or mtime changed is decoded and checked again."
    r = _copy(clean, tmp_path)
    a, b = EMIDataset(r, 'train'), EMIDataset(r, 'train')
    assert (a.check['decoded'], b.check['decoded']) == (32, 0) and a.lengths.tolist() == b.lengths.tolist()
    p = r/f'audio/{_fid(r, "train", 5):05d}.mp3'; st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1)); assert EMIDataset(r, 'train').check['decoded'] == 1
    y, _ = load_audio(p, None); sf.write(p, np.zeros(len(y), np.float32), SR, format='MP3')
    with pytest.raises(DataError, match='digital silence'): EMIDataset(r, 'train')

def test_reference_test_layout_refused_with_what_to_do(clean, tmp_path):
    "test_data/raw + test_data/sound and no test CSV: emi_check and emi_train name it; the command they give makes it the test split."
    r = _copy(clean, tmp_path); (r/'test_data/raw').mkdir(parents=True); (r/'test_data/sound').mkdir()
    for f in pd.read_csv(r/'test_split.csv').Filename:
        shutil.move(r/f'raw/{f:05d}.mp4', r/'test_data/raw'); shutil.move(r/f'audio/{f:05d}.mp3', r/'test_data/sound')
    (r/'test_split.csv').unlink(); (r/'test_labels.csv').unlink()
    code, out = _emi_check(r, '--speech-sample', 0)
    assert code == 1 and any(l.startswith('error') and "test_data  the reference code's separate test layout" in l for l in out.splitlines()), out
    t = run_cli('emi_train', *TINY, '--data-root', r, '--run-dir', tmp_path/'run', check=False, env=ENV)
    assert t.returncode == 2 and f"emi_train: {r/'test_data'}: the reference code's separate test layout" in t.stderr, t.stderr
    subprocess.run(['bash', '-c', out.split('`')[1]], check=True)   # the command emi_check gives, as it stands
    code, out = _emi_check(r, '--speech-sample', 0)
    assert code == 0 and len(EMIDataset(r, 'test', labels=False)) == 16 and not any((r/'test_data/raw').iterdir()), out

def test_video_without_sound_is_named(clean, tmp_path):
    "In the release's form, a clip whose mp4 has no audio stream: strict loading names it, quarantine leaves it out and lists it."
    from emi_nb.synth import write_video
    r = _release_form(clean, tmp_path); f = _fid(r, 'train', 3); p = r/f'raw/{f:05d}.mp4'
    write_video(np.random.default_rng(0), p, 2.0, 30, np.zeros((16, 16, 3), np.uint8))
    with pytest.raises(DataError) as e: EMIDataset(r, 'train')
    assert e.value.path == str(p) and e.value.reason == 'no audio stream (a video without sound?)'
    q = EMIDataset(r, 'train', quarantine=True)
    assert len(q) == 31 and q.report[0]['file'] == str(p) and 'no audio stream' in q.report[0]['problem']
