"Synthetic corpus: determinism (checksums), layout, build time and statistics of the smoke corpus, cached builds."
import json, os, resource, time
from pathlib import Path
import numpy as np, pandas as pd, pytest
from conftest import run_cli
from emi_nb.config import EMOTIONS, VAD_NAMES, data_kind, make_config
from emi_nb.synth import build_corpus, build_vad_corpus, ensure_corpus, corpus_checksum, corpus_name, GENERATOR_VERSION

def _sha(out:str, kind:str) -> str:
    line = next(l for l in out.splitlines() if l.startswith(f'{kind} corpus'))
    return line.split('sha256 ')[1].strip()

def _child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN); return r.ru_utime + r.ru_stime

def test_emi_synth_same_seed_same_bytes_other_seed_differs(tmp_path):
    "Must-show 1: emi_synth twice with one seed -> identical checksums (also with another worker count); another seed -> different."
    c0, t0 = _child_cpu(), time.time()
    a = run_cli('emi_synth', '--profile', 'smoke', '--corpus.seed', 0, '--output-dir', tmp_path/'a', '--vad-output-dir', tmp_path/'av', '--checksum').stdout
    cpu, wall = _child_cpu() - c0, time.time() - t0
    b = run_cli('emi_synth', '--profile', 'smoke', '--corpus.seed', 0, '--output-dir', tmp_path/'b', '--vad-output-dir', tmp_path/'bv', '--checksum', '--corpus.workers', 1).stdout
    c = run_cli('emi_synth', '--profile', 'smoke', '--corpus.seed', 1, '--output-dir', tmp_path/'c', '--vad-output-dir', tmp_path/'cv', '--checksum').stdout
    print(a, b, c, f"smoke build (emi + vad): {wall:.1f} s wall, {cpu:.1f} s CPU", sep='\n')
    assert _sha(a, 'emi') == _sha(b, 'emi') and _sha(a, 'vad') == _sha(b, 'vad')
    assert _sha(a, 'emi') != _sha(c, 'emi') and _sha(a, 'vad') != _sha(c, 'vad')
    assert (tmp_path/'a/audio/00001.mp3').read_bytes() == (tmp_path/'b/audio/00001.mp3').read_bytes()
    # the smoke corpus must build in <= 15 s on 2 cores; CPU time is what a loaded test machine can measure fairly
    assert cpu < 30, f"smoke corpus took {cpu:.1f} CPU-s (budget: 15 s on 2 cores)"

def test_emi_synth_refuses_non_empty_out(tmp_path):
    (tmp_path/'x').mkdir(); (tmp_path/'x/f').write_text('')
    r = run_cli('emi_synth', '--profile', 'smoke', '--output-dir', tmp_path/'x', check=False)
    assert r.returncode == 2 and 'not empty' in r.stderr

@pytest.fixture(scope='module')
def smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp('synth')
    return build_corpus(d/'emi', 'smoke'), build_vad_corpus(d/'vad', 'smoke')

def test_layout(smoke):
    root, vad = smoke
    meta = json.loads((root/'SYNTHETIC.json').read_text())
    assert meta['version'] == GENERATOR_VERSION and meta['corpus']['seed'] == 0 and meta['counts']['train'] == 32 and data_kind(root) == 'synthetic'
    S = make_config('smoke').corpus; ids = {}
    for s in ('train', 'valid', 'test'):
        df = pd.read_csv(root/f'{s}_split.csv'); ids[s] = set(df.Filename)
        assert len(df) == getattr(S, s)
        assert list(df.columns) == (['Filename'] if s == 'test' else ['Filename'] + EMOTIONS)
        for f in df.Filename:
            assert (root/f'audio/{f:05d}.mp3').stat().st_size > 0 and (root/f'raw/{f:05d}.mp4').exists() and (root/f'face_images/{f:05d}').is_dir()
    assert not (ids['train'] & ids['valid']) and not (ids['train'] & ids['test']) and not (ids['valid'] & ids['test'])
    hidden = pd.read_csv(root/'test_labels.csv'); assert set(hidden.Filename) == ids['test'] and list(hidden.columns) == ['Filename'] + EMOTIONS
    for s in ('vad_train', 'vad_valid'):
        v = pd.read_csv(vad/f'{s}.csv'); assert list(v.columns) == ['Filename'] + VAD_NAMES and len(v) == getattr(S, s)
        assert ((v[VAD_NAMES] >= 0) & (v[VAD_NAMES] <= 1)).all().all()
        assert all((vad/f'audio/{f:05d}.mp3').exists() for f in v.Filename)

def test_speakers_disjoint(smoke):
    root, vad = smoke
    m, mv = pd.read_csv(root/'SYNTHETIC_clips.csv'), pd.read_csv(vad/'SYNTHETIC_clips.csv')
    groups = [set(m[m.split == s].speaker) for s in ('train', 'valid', 'test')] + [set(mv[mv.split == s].speaker) for s in ('vad_train', 'vad_valid')]
    for i in range(len(groups)):
        for j in range(i + 1, len(groups)): assert not groups[i] & groups[j]
    assert len(set(map(len, groups))) > 0

def test_smoke_statistics(smoke):
    "The smoke corpus keeps its edge cases: a clip under 1 s, one over the smoke cut (6 s), audio mono 16 kHz, every frame-rate kind."
    root, _ = smoke
    from emi_nb.data import load_audio, video_info
    m = pd.read_csv(root/'SYNTHETIC_clips.csv')
    assert (m.duration < 1).any() and (m.duration > 6).any()
    tr = m[m.split == 'train']
    assert ((tr[EMOTIONS] < 0.05).mean() > 0.3).all()
    y, info = load_audio(root/f'audio/{int(m.Filename[0]):05d}.mp3', None)
    assert info['channels'] == 1 and info['orig_sr'] == 16000 and abs(info['seconds'] - m.duration[0]) < 0.01
    assert set(m.fps.astype(str)) >= {'30', '1000'}
    r = m[m.fps.astype(str) == '30'].iloc[0]
    vi = video_info(root/f'raw/{int(r.Filename):05d}.mp4')
    assert vi['fps'] == 30 and vi['frames'] == r.video_frames and abs(vi['duration'] - r.duration) < 0.05

def test_ensure_corpus_cached_and_atomic(tmp_path, monkeypatch):
    monkeypatch.setenv('EMI_CACHE', str(tmp_path))
    import emi_nb.synth as S
    C = make_config('smoke', **{'corpus.train': 3, 'corpus.valid': 2, 'corpus.test': 2, 'corpus.vad_train': 2, 'corpus.vad_valid': 2, 'corpus.seed': 3}).corpus
    p = ensure_corpus(C); assert (p/'SYNTHETIC.json').exists() and p.name == corpus_name(C, 'emi') and p.name.endswith(f'-v{GENERATOR_VERSION}')
    t = os.path.getmtime(p/'SYNTHETIC.json'); assert ensure_corpus(C) == p and os.path.getmtime(p/'SYNTHETIC.json') == t
    assert not list(p.parent.glob('.*.tmp'))
    v = S.ensure_vad_corpus(C); assert (v/'vad_train.csv').exists() and v != p

def test_videos_carry_the_sound(smoke):
    "Each raw/*.mp4 holds its clip's sound as the release's do (AAC, 16 kHz mono): its mp3's signal, plus under 64 ms of encoder padding."
    root, _ = smoke
    from emi_nb.data import load_audio
    for f in pd.read_csv(root/'train_split.csv').Filename[:8]:
        a, _ = load_audio(root/f'audio/{f:05d}.mp3', None); v, info = load_audio(root/f'raw/{f:05d}.mp4', None)
        assert info['format'] == 'aac' and 0 <= len(v) - len(a) < 1024, (f, len(a), len(v))
        assert np.corrcoef(a, v[:len(a)])[0, 1] > 0.99
