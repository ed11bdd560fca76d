"""emi_train / emi_predict end to end on the smoke corpus with the tiny backbone: resume after kill -9, torchrun vs one
process, same seed -> same results, prediction on mixed audio with a corrupt file, degenerate correlation losses."""
import json, os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np, pandas as pd, pytest, soundfile as sf, torch
from safetensors.torch import load_file
from conftest import run_cli, BIN
from unittest import mock
from emi_nb.config import EMOTIONS, make_config, amp_dtype, ConfigError
from emi_nb.train import fit
from emi_nb.loop import resolve_checkpoint, emi_loss

ENV = dict(os.environ, OMP_NUM_THREADS='1', EMI_PROGRESS='off')
TINY = ['--profile', 'smoke', '--backbone', 'preset:tiny', '--device', 'cpu', '--quiet']

def _train(run_dir, *extra, check=True, quiet=True, **kw):
    flags = TINY if quiet else [a for a in TINY if a != '--quiet']
    return run_cli('emi_train', *flags, '--run-dir', run_dir, *extra, check=check, env=ENV, **kw)

def _results(run_dir, name='emi'): return json.loads((Path(run_dir)/'results'/f'{name}.json').read_text())

def _weights(run_dir, name='emi', which='best'):
    return load_file(str(resolve_checkpoint(Path(run_dir)/'checkpoints'/name, which)/'model.safetensors'))

def _strip(res):
    "A results JSON without what legitimately differs between two runs: wall-clock times and paths of the run."
    res = json.loads(json.dumps(res))
    for k in ('timing', 'checkpoint', 'path'): res.pop(k, None)
    res['provenance'].pop('time'); res['config'].pop('run_dir')
    return res

def test_same_seed_same_results(tmp_path):
    "Same seed twice on CPU -> identical results JSON apart from timestamps and the run directory."
    for r in ('a', 'b'): _train(tmp_path/r, '--epochs', '2', '--max-steps', '2')
    a, b = _results(tmp_path/'a'), _results(tmp_path/'b')
    assert _strip(a) == _strip(b)
    assert set(a) >= {'config', 'seed', 'provenance', 'metrics', 'timing'}
    m = a['metrics']
    assert len(m['curves']) == 2 and m['best_epoch'] in (1, 2) and list(m['valid']['per_emotion']) == EMOTIONS
    assert len(m['valid']['ci']) == 2 and a['provenance']['data_kind'] == 'synthetic' and a['provenance']['data_fingerprint']
    wa, wb = _weights(tmp_path/'a'), _weights(tmp_path/'b')
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sub = pd.read_csv(tmp_path/'a'/'results'/'emi_test_submission.csv')
    assert list(sub.columns) == ['Filename', *EMOTIONS] and sub[EMOTIONS].min().min() >= 0 and sub[EMOTIONS].max().max() <= 1

CKPT_ARGS = ('--epochs', '2', '--max-steps', '3', '--ckpt-steps', '1')

def _tone(sr, seconds, channels, f=220.0):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * f * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return np.stack([x * (0.5 + 0.5 * c) for c in range(channels)], 1).astype(np.float32)

def _predict(run_dir, audio, cmd=None) -> Path:
    "emi_predict (or `cmd`, a command line that runs it) of a run's best checkpoint on folder `audio`; the CSV."
    out = Path(run_dir)/'preds.csv'
    args = ['--checkpoint', str(Path(run_dir)/'checkpoints'/'emi'), str(audio), '--output', str(out)]
    r = subprocess.run([*(cmd or [str(BIN/'emi_predict')]), *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return out

@pytest.fixture(scope='module')
def ref_run(tmp_path_factory):
    "A run of CKPT_ARGS never interrupted, and its predictions on two tones (preds.csv in the run folder)."
    d = tmp_path_factory.mktemp('ref')
    audio = d/'audio'; audio.mkdir()
    sf.write(audio/'a.wav', _tone(16_000, 1.5, 1), 16_000)
    sf.write(audio/'b.wav', _tone(48_000, 2.5, 2, 330), 48_000)
    _train(d/'run', *CKPT_ARGS)
    _predict(d/'run', audio)
    return d/'run', audio

def _kill_mid_epoch(cmd:list, run:Path) -> dict:
    "Start `cmd` (a training into `run`), SIGKILL it at its first checkpoint inside epoch 1; the pointer it was killed at."
    latest = run/'checkpoints'/'emi'/'latest.json'
    p = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0, killed_at = time.time(), None
    while time.time() - t0 < 300 and p.poll() is None:
        if latest.exists():
            try: st = json.loads(latest.read_text())
            except json.JSONDecodeError: st = {}
            if st.get('epoch') == 1 and st.get('step', 0) >= 1:
                os.kill(p.pid, signal.SIGKILL); p.wait(); killed_at = st; break
        time.sleep(0.05)
    assert killed_at is not None, f"the run ended (rc={p.returncode}) before it could be killed mid-epoch"
    assert p.returncode == -signal.SIGKILL and not (run/'results'/'emi.json').exists()
    return killed_at

def test_kill9_resume_matches_uninterrupted(tmp_path, ref_run):
    "kill -9 in the middle of an epoch, resume -> the same curves, metrics and weights as a run never interrupted."
    run = tmp_path/'killed'
    _kill_mid_epoch([str(BIN/'emi_train'), *TINY, '--run-dir', str(run), *CKPT_ARGS], run)
    r = _train(run, *CKPT_ARGS, '--resume'); assert r.returncode == 0
    a, b = _results(ref_run[0]), _results(run)
    assert a['metrics'] == b['metrics']
    for which in ('best', 'latest'):
        wa, wb = _weights(ref_run[0], which=which), _weights(run, which=which)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), which

_FLAT = """
import sys
from emi_nb import train
from emi_nb.model import cudnn_flat_rnns
def flat(fn, what):
    "`fn` asserting that the model's LSTM is laid out as cuDNN lays it out, and saying so."
    def checked(*a, **k):
        lstm = train._unwrap(a[1]).lstm
        assert len({p.untyped_storage().data_ptr() for p in lstm.parameters()}) == 1, 'the LSTM is not flat'
        print(f'flat LSTM {what}', flush=True)
        return fn(*a, **k)
    return checked
train.write_weights, train.read_weights = flat(train.write_weights, 'written'), flat(train.read_weights, 'read')
with cudnn_flat_rnns(): getattr(train, sys.argv[1] + '_cli')(sys.argv[2:])
"""

def test_flat_lstm_run_is_byte_identical(tmp_path, ref_run):
    "The LSTM's weights views of one buffer, as cuDNN leaves them on a GPU: train, checkpoint, kill -9, resume, predict -> the same bytes."
    ref, audio = ref_run
    run, flat = tmp_path/'flat', [sys.executable, '-c', _FLAT]
    _kill_mid_epoch([*flat, 'emi_train', *TINY, '--run-dir', str(run), *CKPT_ARGS], run)
    r = subprocess.run([*flat, 'emi_train', *TINY, '--run-dir', str(run), *CKPT_ARGS, '--resume'], env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and 'flat LSTM read' in r.stdout and 'flat LSTM written' in r.stdout, r.stderr[-2000:]
    preds = _predict(run, audio, [*flat, 'emi_predict'])
    assert _results(ref)['metrics'] == _results(run)['metrics']
    for which in ('best', 'latest'):
        f = lambda d: (resolve_checkpoint(d/'checkpoints'/'emi', which)/'model.safetensors').read_bytes()
        assert f(ref) == f(run), which
    assert preds.read_bytes() == (ref/'preds.csv').read_bytes()

def test_torchrun_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU) takes the same steps as one process with the same global batch.

    Tolerance: the two runs differ only in floating-point summation order (each rank pads its half batch to its own
    longest clip; DDP averages gradients). Validation rho and MSE and the training loss agree to 1e-4 (measured: 5e-6),
    the running training rho to 1e-3 (measured 1.2e-4: rho of the first steps' near-constant predictions is sensitive),
    and the weights to 1e-3 in relative L2 norm (measured 1.8e-4). Individual weights may differ by up to lr per step:
    the attention key biases have an exactly-zero true gradient (softmax is shift invariant), so theirs is rounding
    noise, which Adam normalises to steps of +-lr."""
    args = ('--epochs', '2', '--max-steps', '3', '--batch-size', '8', '--no-dropout')
    _train(tmp_path/'one', *args)
    r = subprocess.run([str(BIN/'torchrun'), '--standalone', '--nproc_per_node', '2', '-m', 'emi_nb.train', *TINY,
                        '--run-dir', str(tmp_path/'two'), *args], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _results(tmp_path/'one'), _results(tmp_path/'two')
    assert b['world_size'] == 2 and a['world_size'] == 1
    ca, cb = a['metrics']['curves'], b['metrics']['curves']
    assert len(ca) == len(cb) == 2
    for x, y in zip(ca, cb):
        assert x['steps'] == y['steps'] == 3
        for k in ('train_loss', 'val_mse', 'val_rho'): assert x[k] == pytest.approx(y[k], abs=1e-4), k
        assert x['train_rho'] == pytest.approx(y['train_rho'], abs=1e-3)
    assert a['metrics']['valid']['rho'] == pytest.approx(b['metrics']['valid']['rho'], abs=1e-4)
    wa, wb = _weights(tmp_path/'one', which='latest'), _weights(tmp_path/'two', which='latest')
    rel = (sum(float(((wa[k] - wb[k])**2).sum()) for k in wa) / sum(float((wa[k]**2).sum()) for k in wa)) ** 0.5
    assert rel < 1e-3, f"relative L2 difference of the weights {rel:.2e}"

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp('trained')
    fit(make_config('smoke', backbone='preset:tiny', device='cpu', run_dir=str(d), epochs=1, max_steps=1), 'emi', quiet=True)
    return d/'checkpoints'/'emi'

def test_predict_mixed_folder_and_corrupt_file(tmp_path, trained):
    "A folder of 48 kHz stereo wav, mp3 and a corrupt file: CSV of the good ones, the bad one named, exit code 1."
    d = tmp_path/'audio'; d.mkdir()
    sf.write(d/'a_stereo48k.wav', _tone(48_000, 2.0, 2), 48_000)
    sf.write(d/'b_mono.mp3', _tone(16_000, 1.5, 1, 330), 16_000, format='MP3')
    sf.write(d/'c_long.wav', _tone(22_050, 9.0, 1, 150), 22_050)
    (d/'d_corrupt.wav').write_bytes(b'RIFF\x00\x00\x00\x00WAVEfmt garbage' + bytes(100))
    (d/'notes.txt').write_text('not audio')
    out = tmp_path/'preds.csv'
    r = run_cli('emi_predict', '--checkpoint', trained, d, '--output', out, check=False, env=ENV)
    assert r.returncode == 1 and 'd_corrupt.wav' in r.stderr
    df = pd.read_csv(out)
    assert df.Filename.tolist() == ['a_stereo48k', 'b_mono', 'c_long']
    assert list(df.columns[:7]) == ['Filename', *EMOTIONS] and df[EMOTIONS].notna().all().all()
    assert df[EMOTIONS].min().min() >= 0 and df[EMOTIONS].max().max() <= 1
    assert df.set_index('Filename').loc['c_long', 'used_seconds'] == pytest.approx(6.0)   # smoke max_seconds: cut
    err = pd.read_csv(tmp_path/'preds.errors.csv'); assert err.path.str.endswith('d_corrupt.wav').all()
    r2 = run_cli('emi_predict', '--checkpoint', trained, d/'c_long.wav', d/'b_mono.mp3', '--long', 'windows',
                 '--batch-size', '4', '--output', tmp_path/'w.csv', env=ENV)
    w = pd.read_csv(tmp_path/'w.csv').set_index('Filename')
    assert w.loc['c_long', 'windows'] == 2 and w.loc['c_long', 'used_seconds'] == pytest.approx(9.0)   # 6 s + 3 s
    assert w.loc['b_mono', EMOTIONS].to_numpy() == pytest.approx(df.set_index('Filename').loc['b_mono', EMOTIONS].to_numpy(), abs=1e-5)

@pytest.mark.parametrize('cap,name', [((7, 0), 'Tesla V100'), ((7, 5), 'Tesla T4'), ((8, 0), 'NVIDIA A100'),
                                      ((9, 0), 'NVIDIA H100')])
def test_amp_follows_compute_capability(cap, name):
    "amp=auto is the paper's fp16 (GradScaler on) on every GPU; bf16 only where it is native, though all say they support it."
    with mock.patch('torch.cuda.get_device_capability', return_value=cap), \
         mock.patch('torch.cuda.get_device_name', return_value=name), \
         mock.patch('torch.cuda.is_bf16_supported', return_value=True):
        assert amp_dtype('cuda', 'auto') == amp_dtype('cuda:0', 'fp16') == torch.float16 and amp_dtype('cuda', 'off') is None
        if cap >= (8, 0): assert amp_dtype('cuda', 'bf16') == torch.bfloat16
        else:
            with pytest.raises(ConfigError, match=f"{name} .compute capability {cap[0]}.{cap[1]}. has no native bf16"):
                amp_dtype('cuda', 'bf16')
    assert make_config('paper').amp == 'auto' and make_config('paper').scaler_init == 2**10

def _grads(t, batch) -> tuple:
    "The clips of each forward and the gradients of one accumulated step of trainer `t` on `batch` (then cleared)."
    sizes, step = [], t.loop.step_fn
    t.loop.step_fn = lambda b: (sizes.append(len(b['labels'])), step(b))[1]
    loss, info, ok = t.loop.accumulate(batch)
    t.loop.step_fn = step
    g = {k: p.grad.clone() for k, p in t.model.named_parameters() if p.grad is not None}
    t.model.zero_grad(set_to_none=True)
    assert ok and info['n'] == len(batch['labels'])
    return sizes, loss, g

def test_memory_plan_fake_budget(tmp_path, capsys):
    "A fake memory budget that fits half the batch: the documented plan, printed and recorded; the same gradients as the whole batch."
    from emi_nb.train import Trainer, static_bytes, FILL
    from emi_nb.model import activation_costs, batch_bytes
    cfg = make_config('smoke', backbone='preset:tiny', device='cpu', run_dir=str(tmp_path), epochs=1, max_steps=1)
    t = Trainer(cfg, no_dropout=True, quiet=True)
    assert t.mem['line'] == 'plan: 1 x 8 clips, checkpointing off (no memory budget)' and t.mem['costs'] is None
    costs = activation_costs(t.model)
    half = (static_bytes(t.model) + batch_bytes(costs['off'], 4, cfg.max_seconds)) / FILL
    t = Trainer(cfg.replace(memory_gb=1.001 * half / 2**30), no_dropout=True)
    assert (t.mem['steps'], t.mem['micro_batch'], t.mem['checkpointing'], t.mem['budget_from']) == (2, 4, False, 'memory_gb')
    assert f"  memory     {t.mem['line']}" in capsys.readouterr().out and t.mem['line'].startswith('plan: 2 x 4 clips')
    t._setup()
    batch = next(t._batches(0, 0))
    parts = _grads(t, batch)
    t.mem = dict(t.mem, micro_batch=8)
    whole = _grads(t, batch)
    assert parts[0] == [4, 4] and whole[0] == [8] and parts[1] == pytest.approx(whole[1], rel=1e-5)
    assert parts[2].keys() == whole[2].keys()
    for k, g in whole[2].items(): assert torch.allclose(parts[2][k], g, rtol=1e-4, atol=1e-6), k
    tight = 0.99 * static_bytes(t.model) / FILL / 2**30
    with pytest.raises(ConfigError, match='memory plan: even 1 clip'): Trainer(cfg.replace(memory_gb=tight), quiet=True)

def test_memory_plan_recorded(tmp_path):
    "Fields that force the plan on a CPU: micro-batches of 3 with checkpointing, trained, in the results JSON."
    cfg = make_config('smoke', backbone='preset:tiny', device='cpu', run_dir=str(tmp_path), epochs=1, max_steps=1,
                      micro_batch=3, grad_checkpointing=True)
    res = fit(cfg, 'emi', quiet=True)
    p = _results(tmp_path)['memory_plan']
    assert p['line'] == res['memory_plan']['line'] == 'plan: 3 x 3 clips, checkpointing on (no memory budget)'
    with pytest.raises(ConfigError, match='cannot be accumulated'): fit(cfg.replace(loss='ccc'), 'ccc', quiet=True)

def test_degenerate_correlation_losses_do_not_nan(tmp_path):
    "1-rho / CCC on a model pushed to constant output: steps skipped and counted, weights stay finite."
    cfg = make_config('smoke', backbone='preset:tiny', device='cpu', run_dir=str(tmp_path), epochs=1, max_steps=2, lr=1e-12)
    for loss in ('pearson', 'ccc'):
        from emi_nb import train as T
        tr = T.Trainer(cfg.replace(loss=loss), f'emi_{loss}', quiet=True)
        with torch.no_grad():                                    # a collapsed model: the head outputs a constant
            last = tr.model.head[-1] if isinstance(tr.model.head, torch.nn.Sequential) else tr.model.head
            last.weight.zero_(); last.bias.fill_(0.1)
        with pytest.warns(UserWarning, match='constant'): res = tr.fit()
        c = res['metrics']['curves'][0]
        assert c['flat_pred_steps'] == 2 and c['skipped_steps'] == (2 if loss == 'pearson' else 0)
        w = _weights(tmp_path, f'emi_{loss}', 'latest')
        assert all(torch.isfinite(v).all() for v in w.values())
        assert np.isnan(res['metrics']['valid']['rho']) or res['metrics']['valid']['n_undefined'] > 0

def test_emi_loss_global_batch_weights():
    "Padding rows (weight 0) never change a loss."
    p, y = torch.rand(6, 6), torch.rand(6, 6)
    for kind in ('mse', 'ccc', 'pearson'):
        full = emi_loss(p[:4], y[:4], kind)[0]
        padded = emi_loss(p, y, kind, torch.tensor([1., 1, 1, 1, 0, 0]))[0]
        assert float(full) == pytest.approx(float(padded), abs=1e-6), kind

def test_early_stopping_and_train_valid(tmp_path):
    "patience stops a run whose validation rho does not improve; train+valid keeps the last epoch and scores the hidden test labels."
    base = make_config('smoke', backbone='preset:tiny', device='cpu', run_dir=str(tmp_path), max_steps=1, n_boot=50)
    r = fit(base.replace(epochs=4, patience=1, lr=0.0), 'flat', quiet=True)['metrics']    # lr 0: rho never improves
    assert r['epochs_run'] == 2 and r['stopped_early'] and r['best_epoch'] == 1
    r = fit(base.replace(epochs=2, train_on='train+valid'), 'full', quiet=True)['metrics']
    assert r['best_epoch'] == 2 and r['valid_in_sample'] and r['test'] is not None and len(r['test']['ci']) == 2
    assert r['curves'][0]['steps'] == 1

def test_smoke_scale_training_learns(tmp_path, monkeypatch):
    """The smoke recipe (tiny VAD-pretrained backbone, CPU) learns: valid rho's 95% CI lies above .05. The 32/16 smoke
    corpus is too small to show that (16 validation clips: a CI of about +-0.2), so this corpus has the smoke corpus' short
    clips but 128 train and 96 validation clips, and the run has room to converge: up to 12 epochs at lr 3e-3 (measured
    with generator 2.1, seed 1: rho .183 [.098, .281], best epoch 8, converged; at the smoke lr 1e-3: .122 [.041, .216])."""
    import emi_nb.synth as S
    corpus = make_config('smoke', **{'corpus.train': 128, 'corpus.valid': 96, 'corpus.test': 16}).corpus
    root = S.build_corpus(tmp_path/'corpus', corpus)
    cfg = make_config('smoke', data_root=str(root), epochs=12, lr=3e-3, run_dir=str(tmp_path/'run'), n_boot=500)
    v = fit(cfg, 'learns', quiet=True)['metrics']['valid']
    assert v['n'] == 96 and v['ci'][0] > 0.05, v

_KILL_IN_WRITE = """
import os, signal, sys, torch
from emi_nb import train
real, calls = torch.save, []
def dying_save(obj, f, *a, **k):
    calls.append(str(f))
    if len(calls) == int(sys.argv[1]):
        real(obj, f, *a, **k)
        data = open(f, 'rb').read()
        open(f, 'wb').write(data[:len(data) // 3])
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *a, **k)
torch.save = dying_save
train.emi_train_cli(sys.argv[2:])
"""

def _killed_run(tmp_path, at_save:int):
    "A run killed in its `at_save`-th checkpoint write; (run dir, its checkpoints, the kill)."
    run = tmp_path/'run'
    p = subprocess.run([sys.executable, '-c', _KILL_IN_WRITE, str(at_save), *TINY, '--run-dir', str(run), *CKPT_ARGS],
                       env=ENV, capture_output=True, text=True, timeout=600)
    return run, run/'checkpoints'/'emi', p

def test_kill_during_checkpoint_write_resumes_from_last_complete_state(tmp_path, ref_run):
    "SIGKILL in the middle of writing state.pt: the pointer still names the previous complete state; --resume finishes identically."
    run, ck, p = _killed_run(tmp_path, 4)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    assert list(ck.glob('.state-*.tmp')), 'the half-written state should be left in its temporary folder'
    latest = json.loads((ck/'latest.json').read_text())
    assert (ck/latest['dir']/'state.pt').exists()
    r = _train(run, *CKPT_ARGS, '--resume', quiet=False)
    assert r.returncode == 0
    assert _results(ref_run[0])['metrics'] == _results(run)['metrics']

def test_damaged_checkpoint_resume_names_file_and_uses_previous_state(tmp_path, ref_run):
    "A truncated newest state and a damaged pointer: --resume names both and continues from the previous complete state."
    run, ck, p = _killed_run(tmp_path, 5)
    newest = ck/json.loads((ck/'latest.json').read_text())['dir']
    w = newest/'model.safetensors'
    w.write_bytes(w.read_bytes()[:1000])
    (ck/'latest.json').write_text('{"dir": "state-e0')
    r = _train(run, *CKPT_ARGS, '--resume', quiet=False)
    assert 'latest.json: damaged pointer' in r.stdout and newest.name in r.stdout and 'newest complete state' in r.stdout
    assert _results(ref_run[0])['metrics'] == _results(run)['metrics']

def test_resume_refuses_when_no_state_is_complete(tmp_path):
    "Every state damaged: --resume exits 2 naming the files and deletes nothing."
    _train(tmp_path, '--epochs', '1', '--max-steps', '1')
    ck = tmp_path/'checkpoints'/'emi'
    for s in ck.glob('state-*'): (s/'state.pt').write_bytes(b'truncated')
    before = sorted(p.name for p in ck.rglob('*'))
    r = _train(tmp_path, '--epochs', '1', '--max-steps', '1', '--resume', check=False)
    assert r.returncode == 2 and 'cannot resume' in r.stderr and 'state.pt' in r.stderr
    assert sorted(p.name for p in ck.rglob('*')) == before

def test_truncated_weights_given_to_predict_is_named(tmp_path, trained):
    "A truncated model.safetensors: emi_predict exits 2 naming the file."
    d = tmp_path/'ck'
    shutil.copytree(resolve_checkpoint(trained, 'best'), d)
    (d/'model.safetensors').write_bytes((d/'model.safetensors').read_bytes()[:500])
    sf.write(tmp_path/'a.wav', _tone(16_000, 1.0, 1), 16_000)
    r = run_cli('emi_predict', '--checkpoint', d, tmp_path/'a.wav', '--output', tmp_path/'p.csv', check=False, env=ENV)
    assert r.returncode == 2 and 'model.safetensors: damaged' in r.stderr and 'Traceback' not in r.stderr
