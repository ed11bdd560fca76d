"Vision: constant-rate frame sampling, packed temporal model with very different frame counts, timing, faces, pickles."
import json, math, pickle
from fractions import Fraction
import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pad_sequence
from emi_nb.data import DataError
from emi_nb.vision import (sample_frames, write_index_video, read_index, frame_timing, timing_table, load_faces, TemporalGRU,
                           VisionModel, FaceCNN, Precomputed, vit_baseline, collate_clips, split_2to1)

torch.set_num_threads(1)

def _expected(n_samples, fps, rate):
    return [math.floor((k + .5) / rate * float(fps) + 1e-9) for k in range(n_samples)]

@pytest.mark.parametrize('fps,n', [(30, 60), (1000, 1500), (Fraction(30000, 1001), 50), (Fraction(125, 2), 90), (25, 7)])
def test_constant_rate_sampling_picks_the_frame_on_screen(tmp_path, fps, n):
    "At 6 fps, sample k is the frame shown at (k + 1/2)/6 s, for 30, 1000, 29.97, 62.5 and 25 fps videos."
    v = write_index_video(tmp_path/'v.mp4', n, fps)
    r = sample_frames(v, rate=6.0)
    dur = n / float(fps)
    assert len(r['frames']) == frame_timing(1, dur)['expected']
    assert read_index(r['frames']) == _expected(len(r['frames']), fps, 6.0)
    assert np.allclose(r['times'], (np.arange(len(r['frames'])) + .5) / 6)
    assert (r['src_times'] <= r['times'] + 1e-9).all() and (np.diff(r['src_times']) >= 0).all()

def test_constant_rate_sampling_other_rates_and_cut(tmp_path):
    v = write_index_video(tmp_path/'v.mp4', 300, 1000)  # 0.3 s at 1,000 fps
    r = sample_frames(v, rate=25.0)
    assert read_index(r['frames']) == _expected(len(r['frames']), 1000, 25.0) and len(r['frames']) == 7  # (k + 1/2)/25 < 0.3
    assert len(sample_frames(v, rate=25.0, max_seconds=0.1)['frames']) == 2
    assert sample_frames(v, rate=6.0, size=(20, 10))['frames'].shape[1:] == (10, 20, 3)

def test_constant_rate_sampling_variable_frame_rate(tmp_path):
    "Irregular presentation times: each sample takes the last frame shown at or before its time."
    rng = np.random.default_rng(0)
    ts = np.round(np.cumsum(np.r_[0, rng.uniform(0.01, 0.12, 59)]), 4)
    v = write_index_video(tmp_path/'vfr.mp4', 60, 100, times=ts)
    r = sample_frames(v, rate=6.0)
    assert read_index(r['frames']) == [int(np.searchsorted(ts, t + 1e-9) - 1) for t in r['times']]

def test_sampling_bad_file_names_it(tmp_path):
    p = tmp_path/'broken.mp4'; p.write_bytes(b'not a video')
    with pytest.raises(DataError, match='broken.mp4'): sample_frames(p)

@pytest.mark.parametrize('layers', [1, 3])
def test_packed_gru_with_very_different_frame_counts_equals_each_alone(layers):
    "Packed: the output at each sequence's last valid step equals running that sequence alone (1 to 800 frames)."
    torch.manual_seed(0)
    lengths = torch.tensor([1, 800, 3, 57, 2])
    seqs = [torch.randn(int(n), 12) for n in lengths]
    x = pad_sequence(seqs, batch_first=True)  # (5, 800, 12)
    tg = TemporalGRU(12, 16, layers=layers).eval()
    alone = torch.stack([tg.gru(s[None])[0][0, -1] for s in seqs])
    torch.testing.assert_close(tg(x, lengths), alone, atol=1e-5, rtol=1e-5)
    # batch order does not matter either
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(tg(x[perm], lengths[perm]), alone[perm], atol=1e-5, rtol=1e-5)
    # the zero-padded variant (no mask) reads padding for every sequence but the longest
    tz = TemporalGRU(12, 16, layers=layers, padding='zeros').eval(); tz.load_state_dict(tg.state_dict())
    gap = (tz(x, lengths) - alone).abs().amax(1)
    assert gap[1] < 1e-5 and (gap[[0, 2, 3, 4]] > 1e-4).all()
    tf = TemporalGRU(12, 16, layers=layers, padding='zeros', pad_to=1000).eval(); tf.load_state_dict(tg.state_dict())
    assert (tf(x, lengths) - alone).abs().amax(1)[1] > 1e-4  # fixed-length padding reaches even the longest

def test_vision_model_batch_equals_each_clip_alone():
    torch.manual_seed(0)
    vm = VisionModel(FaceCNN(d=8), hidden=8).eval()
    counts = [1, 40, 2, 13]
    items = [dict(fid=i, labels=torch.rand(6), faces=torch.randint(0, 255, (n, 3, 24, 24), dtype=torch.uint8)) for i, n in enumerate(counts)]
    with torch.no_grad():
        batch = vm(collate_clips(items))
        alone = torch.cat([vm(collate_clips([it])) for it in items])
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)

def test_frame_timing_quoted_clip():
    "Clip 11437 of the paper (quoted in emi_nb.paper.DATA): frames expected at 6 fps, found, effective rate."
    from emi_nb.paper import DATA
    q = {k: DATA[f'face_11437_{k}'].value for k in ('found', 'seconds', 'expected', 'fps_found')}
    t = frame_timing(q['found'], q['seconds'])
    assert (t['expected'], t['found'], t['drift']) == (q['expected'], q['found'], q['found'] - q['expected'])
    assert abs(t['effective_fps'] - q['fps_found']) < 0.01 and t['end_offset_s'] > 0.4
    assert frame_timing(0, 3.0)['effective_fps'] == 0 and math.isnan(frame_timing(0, 3.0)['sec_per_frame'])

def test_timing_table_and_faces(tmp_path):
    from PIL import Image
    d = tmp_path/'abaw'; (d/'raw').mkdir(parents=True); (d/'face_images/00003').mkdir(parents=True)
    write_index_video(d/'raw/00003.mp4', 150, 25)  # 6 s at 25 fps
    for k in (1, 2, 4, 5, 9):
        Image.fromarray(np.full((30, 30, 3), 20 * k, np.uint8)).save(d/f'face_images/00003/{k:05d}.jpg')
    t = timing_table(d, [3]).iloc[0]
    assert (t.expected, t.found, t.numbered, t.drift) == (36, 5, 9, -31) and abs(t.video_fps - 25) < 1e-6
    f = load_faces(sorted((d/'face_images/00003').iterdir()), size=12)
    assert f.shape == (5, 3, 12, 12) and f.dtype == torch.uint8
    (d/'face_images/00003/00010.jpg').write_bytes(b'garbage')
    with pytest.raises(DataError, match='00010.jpg'): load_faces(sorted((d/'face_images/00003').iterdir()))

def test_vit_features_need_opt_in_and_feed_the_baseline(tmp_path):
    from emi_nb.data import load_pickled_features
    p = tmp_path/'00001.pkl'
    with open(p, 'wb') as fh: pickle.dump(np.random.default_rng(0).random((9, 20)).astype(np.float32), fh)
    with pytest.raises(DataError, match='allow_pickle'): load_pickled_features(p)
    feats = torch.from_numpy(load_pickled_features(p, allow_pickle=True))
    m = vit_baseline(20, hidden=8)
    assert m.temporal.gru.num_layers == 3
    out = m(collate_clips([dict(fid=1, labels=torch.zeros(6), faces=feats), dict(fid=2, labels=torch.zeros(6), faces=feats[:4])]))
    assert out.shape == (2, 6)

def test_split_2to1_by_speaker_keeps_speakers_apart():
    spk = np.repeat(np.arange(12), 5)
    a, b = split_2to1(len(spk), 3, spk)
    assert not set(spk[a]) & set(spk[b]) and len(set(spk[a])) == 8 and len(a) + len(b) == 60

def test_smoke_study_writes_vision_results(smoke_run):
    r = json.loads((smoke_run/'results/vision.json').read_text())
    m = r['metrics']
    assert {'vision', 'vision-zeropad', 'audio-frozen', 'late', 'joint-frozen'} <= set(m['rows'])
    assert all(len(v['rhos']) == r['config']['seeds'] for v in m['rows'].values())
    assert any(k.startswith('train | vision') for k in m['two_to_one']) and any(k.startswith('valid | vision') for k in m['two_to_one'])
    assert r['provenance']['data_kind'] == 'synthetic' and m['timing']['train']['clips'] > 0
    for f in ('vision_timing', 'vision_rows', 'vision_faces'): assert (smoke_run/f'figures/{f}.png').exists()

def test_forked_seed_runs_equal_sequential_runs():
    "run_jobs with two forked workers gives exactly the predictions of the same runs one after the other."
    from emi_nb.vision import run_jobs, FrameMLP
    g = torch.Generator().manual_seed(0)
    items = [dict(fid=i, labels=torch.rand(6, generator=g), faces=torch.randn(int(torch.randint(1, 9, (1,), generator=g)), 5, generator=g)) for i in range(24)]
    jobs = {'a': (lambda: VisionModel(FrameMLP(5, 8), hidden=8), (items[:16], dict(v=items[16:]))),
            'b': (lambda: VisionModel(FrameMLP(5, 8), hidden=8, padding='zeros'), lambda s: (items[s:s + 16], dict(v=items[:4])))}
    seq = run_jobs(jobs, [1, 2, 3], threads=1, epochs=2, batch_size=4)
    par = run_jobs(jobs, [1, 2, 3], threads=1, workers=2, epochs=2, batch_size=4)
    for k in jobs:
        assert len(par[k]['v']) == 3
        for x, y in zip(seq[k]['v'], par[k]['v']): np.testing.assert_allclose(x, y, atol=1e-6)

def test_forked_worker_error_is_reported():
    from emi_nb.vision import run_jobs
    def boom(): raise ValueError('deliberate')
    with pytest.raises(RuntimeError, match='deliberate'):
        run_jobs({'x': (boom, ([], {}))}, [1, 2], workers=2)
