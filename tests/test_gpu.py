"""The GPU check: its CPU dry run end to end (so the prepared check cannot rot), the one-line exit without CUDA, and,
on a machine with a GPU, the CUDA-only checks at the paper geometry and the whole check (marked cuda)."""
import json, time
import numpy as np, pytest, torch
from conftest import run_cli
from emi_nb.gpu import (STAGES, TOL, SIZES, amps_for, lstm_paths, path_equality, equality_clips, amp_steps,
                        collective_check, resume_check, gpu_markdown)
from emi_nb.model import EMIModel, load_backbone
from emi_nb.bench import noise_clips, simulate_real_durations, find_gpu_results, gpu_projection

CHECK_KEYS = {'lstm', 'batched_vs_per_clip', 'amp_steps', 'collectives', 'resume'}

def test_dry_run(tmp_path):
    "emi_gpu_check --dry-run: every stage ok on CPU, the JSON of the real check's shape, marked dry_run; the summary."
    t0 = time.time()
    r = run_cli('emi_gpu_check', '--dry-run', '--run-dir', tmp_path/'run', timeout=900)
    res = json.loads((tmp_path/'run'/'gpu.json').read_text())
    assert res['kind'] == 'emi-gpu-check' and res['dry_run'] is True and res['status'] == 'ok', r.stdout[-3000:]
    assert set(res['stages']) == set(STAGES) and all(s['status'] == 'ok' for s in res['stages'].values())
    c = res['checks']
    assert CHECK_KEYS <= set(c) and c['resume']['exact'] and c['collectives']['backend'] == 'gloo'
    rows = res['throughput']['rows']
    paths = ('per-clip', 'batched+bucketed', 'batched+ckpt')
    assert {(x['path'], x['amp'], x['mode']) for x in rows} == {(p, a, m) for p in paths for a in ('bf16', 'fp16')
                                                               for m in ('fwd', 'fwd+bwd')}
    assert all(x['audio_s_per_s'] > 0 and x['mfu'] is None for x in rows) and res['projection'] is None
    assert res['train']['steps'] == SIZES['dry']['steps'] and res['train']['skipped_steps'] == 0
    assert res['predict']['rows'] == SIZES['dry']['predict_files'] and res['study']['status'] == 'ok'
    assert set(res['device']) >= {'name', 'driver', 'cuda', 'torch', 'peak_tflops'} and res['device']['name'] is None
    md = (tmp_path/'run'/'gpu.md').read_text()
    assert 'DRY RUN' in md and '| checks | ok |' in md and 'audio s / s' not in md
    assert not (tmp_path/'run'/'corpus').exists() and find_gpu_results(tmp_path) is None
    print(f"dry run wall time {time.time() - t0:.0f} s")

def test_without_cuda_one_line_exit_2():
    if torch.cuda.is_available(): pytest.skip('a CUDA GPU is present')
    r = run_cli('emi_gpu_check', check=False, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'no CUDA GPU' in r.stderr
    r = run_cli('emi_gpu_check', '--dry-run', '--publish', check=False, timeout=300)
    assert r.returncode == 2 and 'dry run' in r.stderr

def test_markdown_of_a_failed_partial_result():
    "A stage that failed or timed out still gives a summary naming it."
    stages = dict(env=dict(status='ok', seconds=1.0, cap_s=10),
                  checks=dict(status='timeout', seconds=60.1, cap_s=60, error='past its cap of 60 s'))
    lstm = [dict(amp='fp32', rel_diff=1e-7, tol=1e-4, ok=True)]
    res = dict(status='failed', started='2026-01-01T00:00:00+0000', dry_run=False, stages=stages,
               device=dict(name='NVIDIA H100 80GB HBM3'), checks=dict(lstm=lstm), throughput={}, projection=None,
               train={})
    md = gpu_markdown(res)
    assert 'H100' in md and '| checks | timeout |' in md and 'past its cap' in md
    assert 'LSTM packed vs padded, fp32' in md

@pytest.fixture(scope='module')
def paper_model():
    torch.manual_seed(0)
    return EMIModel(load_backbone('preset:paper', layerdrop=0.0)).to('cuda')

@pytest.mark.cuda
def test_lstm_packed_equals_padded_cuda(paper_model):
    for a in ['fp32', *amps_for('cuda')]:
        r = lstm_paths(paper_model, 'cuda', a)
        assert r['ok'], r

@pytest.mark.cuda
def test_batched_equals_per_clip_paper_geometry_cuda(paper_model):
    res = path_equality(paper_model, equality_clips(8, 12.0), 'cuda', amps_for('cuda'))
    assert all(r['ok'] for k, r in res.items() if k != 'unmasked'), res
    assert res['unmasked']['rel_diff'] > 10 * TOL['bf16'], res['unmasked']

@pytest.mark.cuda
def test_amp_steps_skip_nothing_cuda(paper_model):
    clips = noise_clips(np.minimum(simulate_real_durations(0)[:8], 12.0), 0)
    for a in amps_for('cuda'):
        r = amp_steps(paper_model, clips, 'cuda', a)
        assert r['ok'] and r['skipped'] == 0, r

@pytest.mark.cuda
def test_nccl_collectives_cuda():
    r = collective_check('cuda')
    assert r['ok'] and r['backend'] == 'nccl', r

@pytest.mark.cuda
def test_resume_cuda(tmp_path):
    r = resume_check(tmp_path, 'cuda', timeout=300)
    assert r['ok'] and r['interrupted'], r

@pytest.mark.cuda
def test_gpu_check_cuda(tmp_path):
    "The whole check on this GPU (minutes): every stage ok and a projection of the paper recipe."
    r = run_cli('emi_gpu_check', '--run-dir', tmp_path/'run', check=False, timeout=900)
    res = json.loads((tmp_path/'run'/'gpu.json').read_text())
    assert res['status'] == 'ok', (r.stdout[-2000:], {k: s for k, s in res['stages'].items() if s['status'] != 'ok'})
    assert res['device']['name'] and res['projection'] and gpu_projection(res)['run_hours'] > 0
