"The real checkpoint folder as a fixture: audeering's config (geometry shrunk) and legacy key names load with no missing or unexpected key."
import json, shutil, warnings
import numpy as np, pytest, torch
from safetensors.torch import save_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor
from conftest import ROOT
from emi_nb.config import SR, VAD_NAMES
from emi_nb.data import normalize
from emi_nb.model import EmotionModel, EMIModel, load_backbone

FIXTURE = ROOT/'tests/fixtures/audeering-tiny'
LEGACY = {'parametrizations.weight.original0': 'weight_g', 'parametrizations.weight.original1': 'weight_v'}

def _legacy(sd:dict) -> dict:
    "A state dict under the key names of audeering's file (weight norm saved as weight_g / weight_v)."
    out = {}
    for k, v in sd.items():
        for new, old in LEGACY.items(): k = k.replace(new, old)
        out[k] = v.contiguous()
    return out

@pytest.mark.parametrize('weights', ['pytorch_model.bin', 'model.safetensors'])
def test_audeering_folder_loads_with_no_missing_or_unexpected_key(tmp_path, weights):
    d = tmp_path/'ckpt'; shutil.copytree(FIXTURE, d)
    c = json.loads((d/'config.json').read_text())
    assert c['architectures'] == ['Wav2Vec2ForSpeechClassification'] and c['vocab_size'] is None and c['layerdrop'] == 0.1
    torch.manual_seed(0); ref = EmotionModel(Wav2Vec2Config.from_pretrained(d)).eval()
    sd = _legacy(ref.state_dict())
    assert {'wav2vec2.encoder.pos_conv_embed.conv.weight_g', 'wav2vec2.encoder.pos_conv_embed.conv.weight_v',
            'classifier.dense.weight', 'classifier.out_proj.bias'} <= set(sd)
    if weights.endswith('.bin'): torch.save(sd, d/weights)
    else: save_file(sd, str(d/weights), metadata={'format': 'pt'})
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # no "no VAD head" warning, nothing freshly initialised
        bb = load_backbone(d)
    assert bb.fresh_keys == [] and bb.unexpected_keys == []
    assert (bb.config.layerdrop, bb.config.vocab_size, bb.config.id2label) == (0.1, None, dict(enumerate(VAD_NAMES)))
    x = torch.randn(2, SR)
    with torch.no_grad(): assert torch.equal(ref(x)[1], bb.eval()(x)[1])
    w = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 3 + 1
    fe = Wav2Vec2FeatureExtractor.from_pretrained(d)
    assert fe.return_attention_mask and np.abs(fe(w, sampling_rate=SR)['input_values'][0] - normalize(w)).max() < 1e-5
    m = EMIModel(bb).train()   # LayerDrop 0.1 as published, in training mode
    assert m(torch.randn(3, SR), torch.ones(3, SR, dtype=torch.long)).shape == (3, 6)
