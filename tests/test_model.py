"emi_nb.model: batched == per clip (tiny and paper geometry), padding never leaks, checkpoints load by name, Table 2 rows train."
import os, warnings
import pytest, torch
from torch.nn.utils.rnn import PackedSequence
from transformers import Wav2Vec2Model, Wav2Vec2ForCTC
from emi_nb.config import SR, make_config, VAD_NAMES
from emi_nb.model import (BACKBONE_PRESETS, TABLE2_ROWS, EMIModel, EmotionModel, backbone_config, load_backbone,
                          min_samples, MIN_SAMPLES)

os.environ.setdefault('HF_HUB_OFFLINE', '1')
torch.set_num_threads(2)
HEAD_KEYS = ['classifier.dense.bias', 'classifier.dense.weight', 'classifier.out_proj.bias', 'classifier.out_proj.weight']

def make_batch(seconds, pad_to=None, pad_noise=0.0, seed=0):
    "Random clips of `seconds`, right-padded to the longest (or `pad_to` s); padding = zeros or noise."
    g = torch.Generator().manual_seed(seed)
    n = [int(s * SR) for s in seconds]; T = max(max(n), int((pad_to or 0) * SR))
    clips = [torch.randn(k, generator=g) for k in n]
    x = torch.randn(len(n), T, generator=g) * pad_noise; am = torch.zeros(len(n), T, dtype=torch.long)
    for i, (k, c) in enumerate(zip(n, clips)): x[i, :k] = c; am[i, :k] = 1
    return x, am

def run(m, x, am):
    with torch.no_grad():
        f = m.features(x, am)
        return f, m.head_logits(f)

def assert_same(fa, ya, fb, yb, tol=1e-4):
    "Outputs and fused features equal over valid frames (shapes may differ in padded length)."
    T = min(fa['frames'].shape[1], fb['frames'].shape[1])
    assert torch.equal(fa['mask'][:, :T], fb['mask'][:, :T]) and torch.equal(fa['lengths'], fb['lengths'])
    m = fa['mask'][:, :T, None]
    diffs = {'out': (ya - yb).abs().max(), 'frames': ((fa['frames'][:, :T] - fb['frames'][:, :T]) * m).abs().max()}
    for k in ('global', 'last'):
        if fa[k] is not None: diffs[k] = (fa[k] - fb[k]).abs().max()
    diffs = {k: float(v) for k, v in diffs.items()}
    assert max(diffs.values()) < tol, diffs
    return diffs

def pair(backbone, **kw):
    "The same weights as a batched and a per-clip EMIModel, in eval mode."
    a = EMIModel(backbone, batched=True, **kw).eval()
    b = EMIModel(backbone, batched=False, **kw).eval(); b.load_state_dict(a.state_dict())
    return a, b

@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return load_backbone('preset:tiny')

@pytest.fixture(scope='module')
def paper_dir(tmp_path_factory):
    "A random-weight paper-geometry EmotionModel saved with save_pretrained (~660 MB in a tmp dir)."
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp('paper')/'em'
    EmotionModel(backbone_config('paper')).save_pretrained(d)
    return d

# 1. batched + masked == per clip
@pytest.mark.parametrize('lstm_packed', [False, True])
def test_batched_equals_per_clip_tiny(tiny, lstm_packed):
    a, b = pair(tiny, lstm_packed=lstm_packed)
    x, am = make_batch([0.3, 12.0, 5.0, 0.1, 2.7, 0.9])
    assert_same(*run(a, x, am), *run(b, x, am))
    for i in range(x.shape[0]):  # and each clip alone, unpadded
        L = int(am[i].sum()); fa, ya = run(a, x[i:i+1, :L], None); fb, yb = run(a, x, am)
        assert (ya[0] - yb[i]).abs().max() < 1e-4 and (fa['global'][0] - fb['global'][i]).abs().max() < 1e-4

@pytest.mark.parametrize('row', ['global', 'head+lstm'])
def test_batched_equals_per_clip_rows(tiny, row):
    a, b = pair(tiny, **TABLE2_ROWS[row])
    x, am = make_batch([0.3, 7.0, 1.2])
    assert_same(*run(a, x, am), *run(b, x, am))

def test_batched_equals_per_clip_paper(paper_dir):
    a, b = pair(load_backbone(paper_dir))
    assert a.d == 1027
    x, am = make_batch([12.0, 0.3, 5.0])
    d = assert_same(*run(a, x, am), *run(b, x, am))
    print('paper geometry, batched vs per clip:', d)

# 4. padding never leaks
def test_padding_never_leaks(tiny):
    m = EMIModel(tiny).eval()
    secs = [0.3, 4.0, 1.1]
    x, am = make_batch(secs)
    x2, am2 = make_batch(secs, pad_to=9.0, pad_noise=10.0)
    assert not torch.equal(x2[:, x.shape[1]:], torch.zeros_like(x2[:, x.shape[1]:]))
    assert_same(*run(m, x, am), *run(m, x2, am2))
    # a clip's output does not depend on its batch mates either
    L = int(am[1].sum()); f3, y3 = run(m, x[1:2, :L], None); f, y = run(m, x, am)
    assert (y3[0] - y[1]).abs().max() < 1e-4

def test_padding_never_leaks_train_mode_per_clip(tiny):
    "Per-clip path in train mode: short clips (< SpecAugment's 10 frames) run, padding values are never read."
    torch.manual_seed(0)
    m = EMIModel(tiny, batched=False).train()
    x, am = make_batch([0.1, 0.15, 3.0])
    y = m(x, am); y.sum().backward()
    assert y.shape == (3, 6) and torch.isfinite(y).all()
    mb = EMIModel(tiny, batched=True).train()
    x, am = make_batch([0.1, 0.12])  # padded length < mask_time_length frames
    assert torch.isfinite(mb(x, am)).all()

# 2. checkpoints load by name
def test_paper_checkpoint_roundtrip(paper_dir):
    m, info = EmotionModel.from_pretrained(paper_dir, output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'], info
    bb = load_backbone(paper_dir)
    assert bb.fresh_keys == [] and bb.unexpected_keys == []
    sd0 = m.state_dict()
    assert all(torch.equal(v, sd0[k]) for k, v in bb.state_dict().items())
    assert {k.split('.')[0] for k in sd0} == {'wav2vec2', 'classifier'}
    assert {'classifier.dense.weight', 'classifier.out_proj.weight'} <= set(sd0)
    assert sum(p.numel() for p in bb.wav2vec2.parameters()) == pytest.approx(164.3e6, rel=0.01)
    emi = EMIModel(bb)
    assert emi.d == 1027 and emi.lstm.hidden_size == 1027 and emi.head[0].in_features == 2054
    assert bb.config.id2label == dict(enumerate(VAD_NAMES))

def test_legacy_weight_norm_keys_load(tmp_path, tiny):
    "audeering's file stores the positional conv as weight_g/weight_v in pytorch_model.bin: it loads with no missing key."
    tiny.config.save_pretrained(tmp_path)
    sd = {k.replace('parametrizations.weight.original0', 'weight_g').replace('parametrizations.weight.original1', 'weight_v'): v
          for k, v in tiny.state_dict().items()}
    assert any(k.endswith('weight_g') for k in sd)
    torch.save(sd, tmp_path/'pytorch_model.bin')
    bb = load_backbone(tmp_path)
    assert bb.fresh_keys == [] and bb.unexpected_keys == []
    x = torch.randn(1, SR)
    with torch.no_grad(): assert torch.equal(tiny.eval()(x)[1], bb.eval()(x)[1])

@pytest.mark.parametrize('cls', [Wav2Vec2Model, Wav2Vec2ForCTC])
def test_asr_checkpoint_gets_fresh_head(tmp_path, cls):
    cls(backbone_config('tiny', feat_extract_norm='group', do_stable_layer_norm=False, vocab_size=32)).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match='no VAD head'): bb = load_backbone(tmp_path)
    assert bb.fresh_keys == HEAD_KEYS
    assert bb.classifier.out_proj.out_features == 3
    if cls is Wav2Vec2ForCTC: assert bb.unexpected_keys == ['lm_head.bias', 'lm_head.weight']
    with pytest.warns(UserWarning, match="feat_extract_norm='group'"): m = EMIModel(bb)
    assert m.batched is False
    x, am = make_batch([0.5, 2.0])
    with torch.no_grad(): assert m.eval()(x, am).shape == (2, 6)

def test_group_norm_batched_would_leak(tiny):
    "Why group-norm backbones run per clip: forced batching changes the outputs."
    gn = EmotionModel(backbone_config('tiny', feat_extract_norm='group', do_stable_layer_norm=False))
    with pytest.warns(UserWarning): per = EMIModel(gn).eval()
    forced = EMIModel(gn, batched=False).eval(); forced.batched = True
    x, am = make_batch([0.5, 3.0])
    with torch.no_grad(): assert (per(x, am) - forced(x, am)).abs().max() > 1e-3

def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='not a save_pretrained directory'): load_backbone(tmp_path/'nope')
    with pytest.raises(FileNotFoundError, match='never downloaded'): load_backbone('someone/not-in-the-cache-xyz')
    Wav2Vec2Model(backbone_config('tiny')).save_pretrained(tmp_path/'w')
    with pytest.raises(ValueError, match='lacks backbone weights'):
        load_backbone(tmp_path/'w', num_hidden_layers=3)  # a layer the checkpoint does not have

# 3. Table 2 rows build, train, and frozen parts get no gradient
def grads(m):
    g = lambda mod: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in mod.parameters())
    w = m.backbone.wav2vec2
    return dict(conv=g(w.feature_extractor), transformer=g(w.encoder), vad=g(m.backbone.classifier),
                lstm=bool(m.lstm is not None and g(m.lstm)), head=g(m.head))

@pytest.mark.parametrize('row', list(TABLE2_ROWS))
@pytest.mark.parametrize('freeze', ['', 'freeze_feature_encoder', 'freeze_backbone'])
def test_table2_rows_train(row, freeze):
    torch.manual_seed(0)
    cfg = make_config('smoke').replace(**TABLE2_ROWS[row], **({freeze: True} if freeze else {}))
    m = EMIModel.from_config(cfg, 'preset:tiny', device='cpu').train()
    x, am = make_batch([0.3, 1.5, 0.8])
    y = m(x, am); assert y.shape == (3, 6) and y.dtype == torch.float32
    y.pow(2).mean().backward()
    g = grads(m)
    assert g['head'] and g['lstm'] == TABLE2_ROWS[row]['use_lstm']
    assert g['conv'] == (freeze == '')
    assert g['transformer'] == (freeze != 'freeze_backbone')
    assert g['vad'] == (TABLE2_ROWS[row]['use_vad'] and freeze != 'freeze_backbone')
    if freeze == 'freeze_backbone': assert all(p.grad is None for p in m.backbone.parameters())
    if freeze == 'freeze_feature_encoder': assert all(p.grad is None for p in m.backbone.wav2vec2.feature_extractor.parameters())

def test_table2_rows_match_config_fields():
    from emi_nb.config import StudyConfig
    assert len(TABLE2_ROWS) == 6
    for sw in TABLE2_ROWS.values(): StudyConfig().replace(**sw)
    assert TABLE2_ROWS['global+head+lstm+vad'] == {k: getattr(StudyConfig(), k) for k in ('use_global', 'use_head', 'use_lstm', 'use_vad')}

def test_switch_shapes(tiny):
    m = EMIModel(tiny, use_vad=False, use_head=False, use_lstm=False)
    assert m.d == 32 and isinstance(m.head, torch.nn.Linear) and m.head.in_features == 32 and m.lstm is None
    assert EMIModel(tiny, lstm_dropout=0.1).lstm.dropout == 0.1
    with pytest.raises(ValueError, match='use_global or use_lstm'): EMIModel(tiny, use_global=False, use_lstm=False)

def test_lstm_packed_equals_gather():
    "Packed sequences and padded + gather read the same LSTM output, with the same gradients."
    nodrop = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, mask_time_prob=0.0, final_dropout=0.0)
    x, am = make_batch([0.3, 2.0, 1.1, 0.6])
    res = []
    for packed in (True, False):
        torch.manual_seed(0); m = EMIModel(load_backbone('preset:tiny', **nodrop), lstm_packed=packed).train()
        y = m(x, am); y.pow(2).sum().backward()
        res.append((y.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
    (y1, g1), (y2, g2) = res
    assert set(g1) == set(g2) and (y1 - y2).abs().max() < 1e-5
    assert max((g1[k] - g2[k]).abs().max() for k in g1) < 1e-4
    assert EMIModel(load_backbone('preset:tiny')).lstm_packed is None
    assert EMIModel.from_config(make_config('smoke'), 'preset:tiny', device='cpu').lstm_packed is None

def test_autocast_logits_fp32(tiny):
    m = EMIModel(tiny).eval()
    x, am = make_batch([0.5, 1.0])
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16): y = m(x, am)
    assert y.dtype == torch.float32

def _lstm_sees(m, x, am, dtype) -> tuple:
    "A training forward + backward of `m` under autocast to `dtype`: ((input dtype, autocast on) per LSTM call, output dtype)."
    seen = []
    def hook(mod, a):
        t = a[0].data if isinstance(a[0], PackedSequence) else a[0]
        seen.append((t.dtype, torch.is_autocast_enabled(t.device.type)))
    h = m.lstm.register_forward_pre_hook(hook)
    try:
        with torch.autocast(x.device.type, dtype=dtype): y = m(x, am)
        y.float().square().mean().backward()
    finally: h.remove()
    return seen, y.dtype

@pytest.mark.parametrize('packed', [False, True])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_lstm_runs_fp32_under_autocast(tiny, dtype, packed):
    "Under autocast the LSTM gets fp32 frames with autocast off, packed or padded; its gradients are fp32 and finite."
    m = EMIModel(tiny, lstm_packed=packed).train()
    x, am = make_batch([0.5, 1.0])
    seen, out = _lstm_sees(m, x, am, dtype)
    assert seen == [(torch.float32, False)] and out == torch.float32
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in m.lstm.parameters())
    m.zero_grad(set_to_none=True)

@pytest.mark.cuda
def test_lstm_runs_fp32_under_autocast_cuda():
    "On CUDA autocast would run cuDNN's LSTM in fp16 even under bf16: it gets fp32 frames with autocast off instead."
    torch.manual_seed(0)
    m = EMIModel(load_backbone('preset:tiny', device='cuda')).cuda().train()
    x, am = make_batch([0.5, 1.0]); x, am = x.cuda(), am.cuda()
    for dtype in [torch.float16] + ([torch.bfloat16] if torch.cuda.get_device_capability() >= (8, 0) else []):
        seen, out = _lstm_sees(m, x, am, dtype)
        assert seen == [(torch.float32, False)] and out == torch.float32, (dtype, seen)
        assert all(p.grad.dtype == torch.float32 for p in m.lstm.parameters())
        m.zero_grad(set_to_none=True)

def test_short_clip_refused(tiny):
    assert MIN_SAMPLES == 400 and all(min_samples(backbone_config(p)) == 400 for p in BACKBONE_PRESETS)
    m = EMIModel(tiny)
    x, am = make_batch([0.5, 0.02])
    with pytest.raises(ValueError, match=r'clips \[1\] have fewer than 400 samples'): m(x, am)

def test_grad_checkpointing_same_grads():
    nodrop = dict(hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, mask_time_prob=0.0, final_dropout=0.0)
    torch.manual_seed(0); a = EMIModel(load_backbone('preset:tiny', **nodrop))
    b = EMIModel(load_backbone('preset:tiny', **nodrop), grad_checkpointing=True); b.load_state_dict(a.state_dict())
    x, am = make_batch([0.4, 1.0])
    for m in (a, b): m.train(); m(x, am).sum().backward()
    assert b.backbone.wav2vec2.encoder.gradient_checkpointing
    for p, q in zip(a.parameters(), b.parameters()):
        if p.grad is not None: assert (p.grad - q.grad).abs().max() < 1e-5

def test_from_config_default_backbone_warns():
    cfg = make_config('smoke')
    with pytest.warns(UserWarning, match='random weights'): m = EMIModel.from_config(cfg)
    assert m.backbone.config.hidden_size == BACKBONE_PRESETS['tiny']['hidden_size']

@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA GPU')
def test_cuda_batched_equals_per_clip_amp():
    a, b = pair(load_backbone('preset:small', device='cuda'))
    x, am = make_batch([0.3, 6.0, 2.0]); x, am = x.cuda(), am.cuda()
    assert_same(*run(a, x, am), *run(b, x, am), tol=1e-3)
    with torch.no_grad(), torch.autocast('cuda', dtype=torch.bfloat16): assert a(x, am).dtype == torch.float32
