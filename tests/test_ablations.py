"emi_nb.ablations: cached frozen rows equal recomputed ones; an interrupted grid resumes with only the missing rows."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np
import pytest, torch
from emi_nb.config import make_config
from emi_nb.model import TABLE2_ROWS
from emi_nb.paper import t2

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('EMI_PROGRESS', 'off')
torch.set_num_threads(2)

@pytest.fixture(scope='module')
def smoke():
    "The smoke corpus (cached) and the untrained tiny backbone (cached)."
    from emi_nb.synth import ensure_corpus
    from emi_nb.ablations import untrained_backbone
    return ensure_corpus('smoke'), untrained_backbone('tiny')

def _cfg(tmp_path, root, **kw):
    return make_config('smoke', **{**dict(data_root=str(root), run_dir=str(tmp_path/'run'), device='cpu', epochs=2, n_boot=100), **kw})

def test_cached_and_recomputed_frozen_rows_identical(tmp_path, smoke):
    "Must-show 2: the same frozen row from the feature cache and recomputed through the backbone: identical metrics."
    from emi_nb.ablations import Row, run_grid, feature_store, FrameStore
    root, bb = smoke
    ov = {**TABLE2_ROWS['global+head+lstm+vad'], 'backbone': bb, 'freeze_backbone': True}
    rows = {'cached': Row('cached', 'table2', ov, 'head'), 'live': Row('live', 'table2', ov, 'head', options=dict(source='live'))}
    recs = run_grid(_cfg(tmp_path, root), rows, [1, 2], log=None)
    for s in (1, 2):
        c, l = recs[('cached', s)], recs[('live', s)]
        assert c['status'] == l['status'] == 'ok', (c.get('error'), l.get('error'))
        assert c['metrics'] == l['metrics']
        assert np.array_equal(c['preds']['valid']['pred'], l['preds']['valid']['pred'])
    assert recs[('cached', 1)]['metrics'] != recs[('cached', 2)]['metrics']   # seeds differ
    st = feature_store(bb, root, 'train', 6.0)                                # extracted once, found again
    assert isinstance(st, FrameStore) and (st.dir/'meta.json').stat().st_mtime < time.time() - 0.5

def test_fixed_padding_row_and_fp32_store(tmp_path, smoke):
    "The no-mask fixed-length store has every clip at the cut length; float32 storage equals live float32."
    from emi_nb.ablations import Row, run_grid, feature_store
    root, bb = smoke
    st = feature_store(bb, root, 'valid', 6.0, 'float32', pad=True)
    assert len(set(np.diff(st.offsets).tolist())) == 1 and st.meta['pad_to'] == 6 * 16000
    ov = {**TABLE2_ROWS['global+head'], 'backbone': bb, 'freeze_backbone': True}
    rows = {n: Row(n, 'padding', ov, 'head', options=dict(pad='fixed', dtype='float32', **({'source': 'live'} if n == 'live' else {})))
            for n in ('cached', 'live')}
    recs = run_grid(_cfg(tmp_path, root), rows, [1], log=None)
    assert recs[('cached', 1)]['metrics'] == recs[('live', 1)]['metrics']

GRID_SCRIPT = textwrap.dedent('''
    import sys, time
    from emi_nb.config import make_config
    from emi_nb.ablations import Row, run_grid
    run_dir, delay = sys.argv[1], float(sys.argv[2])
    def runner(cfg, row, seed):
        time.sleep(delay)
        with open(run_dir + '/calls.txt', 'a') as f: f.write(f'{row.name} {seed}\\n')
        return dict(metrics=dict(valid=dict(rho=0.01 * seed)), preds={})
    rows = {f'r{i}': Row(f'r{i}', 'table2', dict(lr=1e-4 * (i + 1))) for i in range(4)}
    run_grid(make_config('smoke', run_dir=run_dir), rows, [1, 2], runner=runner, log=None)
''')

def test_killed_grid_reruns_only_missing_rows(tmp_path):
    "Must-show 3: a grid process killed after some rows; the rerun runs exactly the missing (row, seed) pairs."
    run_dir = tmp_path/'run'; run_dir.mkdir(); script = tmp_path/'grid.py'; script.write_text(GRID_SCRIPT)
    p = subprocess.Popen([sys.executable, str(script), str(run_dir), '1.0'], env={**os.environ, 'EMI_PROGRESS': 'off'})
    done = lambda: len(list((run_dir/'ablations').rglob('*.json'))) if (run_dir/'ablations').exists() else 0
    deadline = time.time() + 120
    while time.time() < deadline and done() < 3: time.sleep(0.05)
    p.send_signal(signal.SIGKILL); p.wait()
    first = {tuple(l.split()) for l in (run_dir/'calls.txt').read_text().split('\n') if l}
    finished = {(f.parent.name, f.stem) for f in (run_dir/'ablations').rglob('*.json')}
    assert 3 <= len(finished) < 8 and finished <= first
    r = subprocess.run([sys.executable, str(script), str(run_dir), '0'], env={**os.environ, 'EMI_PROGRESS': 'off'}, timeout=300)
    assert r.returncode == 0
    calls = [tuple(l.split()) for l in (run_dir/'calls.txt').read_text().split('\n') if l]
    second = calls[len(first):]
    everything = {(f'r{i}', str(s)) for i in range(4) for s in (1, 2)}
    assert set(second) == everything - finished and len(second) == len(set(second))
    assert {(f.parent.name, f.stem) for f in (run_dir/'ablations').rglob('*.json')} == everything

def test_interrupt_failure_and_statistics(tmp_path, smoke):
    "KeyboardInterrupt stops the grid with finished rows on disk; a failing row is recorded; stats and tables follow."
    from emi_nb.ablations import Row, run_grid, run_row, grid_stats, stats_table, agreement
    root, bb = smoke; cfg = _cfg(tmp_path, root, epochs=1)
    base = {'backbone': bb, 'freeze_backbone': True}
    rows = {'full': Row('full', 'table2', {**TABLE2_ROWS['global+head+lstm+vad'], **base}, quoted={'paper': t2('global+head+lstm+vad').value}, ref='full'),
            'global': Row('global', 'table2', {**TABLE2_ROWS['global'], **base}, quoted={'paper': t2('global').value}, ref='full'),
            'broken': Row('broken', 'table2', {**TABLE2_ROWS['global'], 'backbone': str(tmp_path/'nope'), 'freeze_backbone': True}, ref='full')}
    n = []
    def stop_third(c, row, s):
        n.append(1)
        if len(n) == 3: raise KeyboardInterrupt
        return run_row(c, row, s)
    with pytest.raises(KeyboardInterrupt): run_grid(cfg, rows, [1, 2], runner=stop_third, log=None)
    assert len(list((tmp_path/'run/ablations').rglob('*.json'))) == 2
    recs = run_grid(cfg, rows, [1, 2], log=None)
    assert [recs[('broken', s)]['status'] for s in (1, 2)] == ['failed', 'failed'] and 'nope' in recs[('broken', 1)]['error']
    assert all(recs[(r, s)]['status'] == 'ok' for r in ('full', 'global') for s in (1, 2))
    st = grid_stats(recs, rows, root, n_boot=100)
    assert st['global']['n_seeds'] == 2 and len(st['global']['vs_ref']['per_seed']) == 2 and 'vs_ref' not in st['full']
    lo, hi = st['full']['ci']; assert lo <= hi
    tab = stats_table(st, 'table2'); assert list(tab.index) == ['full', 'global', 'broken']
    assert 'Not converged, so not compared' in agreement(st, 'table2')   # 2 epochs: no verdict from these rows
    for r in ('full', 'global'): st[r]['converged'] = True
    assert 'against full' in agreement(st, 'table2')
    json.dumps(st)

def test_fit_row_reads_predictions(tmp_path, smoke):
    "An end-to-end row goes through train.fit and comes back with per-clip predictions for the paired statistics."
    from emi_nb.ablations import Row, run_grid
    root, bb = smoke
    row = Row('t1.train', 'table1', {**TABLE2_ROWS['global+head+lstm+vad'], 'backbone': bb, 'max_steps': 2, 'epochs': 1}, 'fit')
    rec = run_grid(_cfg(tmp_path, root), {'t1.train': row}, [1], log=None)[('t1.train', 1)]
    assert rec['status'] == 'ok', rec.get('error')
    assert len(rec['preds']['valid']['fids']) == 16 and np.isfinite(rec['metrics']['valid']['rho'])
    assert 'test' in rec['preds']

def test_parallel_workers_same_numbers(tmp_path, smoke):
    "Head rows in two worker processes give exactly the numbers of the same rows run in this process."
    from emi_nb.ablations import Row, run_grid
    root, bb = smoke
    rows = {n: Row(n, 'table2', {**TABLE2_ROWS[n], 'backbone': bb, 'freeze_backbone': True}, 'head') for n in ('global+head', 'head+lstm')}
    one = run_grid(_cfg(tmp_path, root, epochs=1, run_dir=str(tmp_path/'one')), rows, [1, 2], workers=1, log=None)
    two = run_grid(_cfg(tmp_path, root, epochs=1, run_dir=str(tmp_path/'two')), rows, [1, 2], workers=2, log=None)
    assert set(one) == set(two)
    for k in one:
        assert one[k]['status'] == two[k]['status'] == 'ok', (one[k].get('error'), two[k].get('error'))
        assert one[k]['metrics'] == two[k]['metrics']

def test_asr_checkpoint_without_head_caches_stably(tmp_path, smoke):
    "An ASR-style checkpoint (no VAD head): the fresh head is drawn from a fixed seed, so checksum and frames are stable."
    import warnings
    from transformers import Wav2Vec2ForCTC
    from emi_nb.model import backbone_config
    from emi_nb.ablations import load_frozen, weights_checksum, feature_store
    root, _ = smoke
    torch.manual_seed(3); Wav2Vec2ForCTC(backbone_config('tiny', vocab_size=32)).save_pretrained(tmp_path/'asr')
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        a, b = load_frozen(str(tmp_path/'asr')), load_frozen(str(tmp_path/'asr'))
        assert weights_checksum(a) == weights_checksum(b)
        st = feature_store(str(tmp_path/'asr'), root, 'valid', 6.0, log=None)
    assert len(st) == 16 and st.hidden.shape[1] == 32
