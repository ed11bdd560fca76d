"Benchmark helpers: timing and ratio summaries, the bench JSON schema, the real-duration simulation, P4's stage table, publishing."
import json, time
import numpy as np
import pytest
from emi_nb.bench import (stats, ratio, time_variants, figure, check_bench, FIGURE_KEYS, padding_share, p2_padding,
                          simulate_real_durations, duration_summary, REAL_DURATIONS, stage_table, p4_study, find_study,
                          epoch_estimate, lstm_flops, count_flops, bench_markdown, publish_bench, RSSPeak)
from emi_nb.config import save_json

def test_stats_and_paired_ratio():
    assert stats([5, 1, 3]) == dict(median=3.0, min=1.0, max=5.0, reps=3)
    r = ratio([2.0, 3.0, 8.0], [1.0, 1.0, 2.0])
    assert (r['median'], r['min'], r['max'], r['reps'], r['per_rep']) == (3.0, 2.0, 4.0, 3, [2.0, 3.0, 4.0])
    with pytest.raises(AssertionError): ratio([1, 2], [1])

def test_time_variants_interleaves_and_rotates():
    order = []
    t = time_variants({k: (lambda k=k: order.append(k)) for k in 'abc'}, reps=2, warmup=1)
    assert order == list('abc' 'bca' 'cab') and all(len(v) == 2 for v in t.values())
    slow = time_variants(dict(fast=lambda: None, slow=lambda: time.sleep(0.02)), reps=3, warmup=0)
    assert ratio(slow['slow'], slow['fast'])['min'] > 1

def test_figure_and_schema():
    f = figure('a vs b', 0.04, 0.05, unit='share', st=stats([0.03, 0.04, 0.06]))
    assert set(FIGURE_KEYS) <= set(f) and f['met'] is True and f['reps'] == 3
    assert figure('x', 6.0, 5.0, '>=')['met'] is True and figure('x', 4.0, 5.0, '>=')['met'] is False
    assert figure('missing', None, 5.0, note='why')['met'] is None and figure('info', 2.0, None)['met'] is None
    check_bench(dict(metrics=dict(P1=f)))
    with pytest.raises(ValueError, match='lacks'): check_bench(dict(metrics=dict(P1={k: f[k] for k in f if k != 'reps'})))
    with pytest.raises(ValueError, match='judged'): check_bench(dict(metrics=dict(P1=dict(f, value=None))))
    with pytest.raises(ValueError, match='no .metrics.'): check_bench(dict(metrics={}))

def test_padding_share_and_p2():
    assert padding_share([10, 5, 5, 5], [[0, 1], [2, 3]]) == pytest.approx(1 - 25 / 30)
    def batches(L, bs, bucket, epoch, seed=1):
        o = np.random.default_rng([seed, epoch]).permutation(len(L))
        if bucket: o = o[np.argsort(np.asarray(L)[o], kind='stable')]
        return [o[i:i + bs] for i in range(0, len(o), bs)]
    p = p2_padding(np.random.default_rng(1).uniform(1, 12, 320), 16, reps=5, batches=batches)
    assert p['random']['reps'] == 5 and p['bucketed']['max'] < 0.05 < p['random']['min']

def test_simulated_real_durations_match_the_quoted_statistics():
    for c in (1.5, 4.0, 16.0):
        d = simulate_real_durations(seed=3, concentration=c); s = duration_summary(d)
        for k in ('n', 'n_short', 'n_long', 'min', 'max'): assert s[k] == pytest.approx(REAL_DURATIONS[k]), k
        assert s['mean'] == pytest.approx(REAL_DURATIONS['mean'], abs=0.006)
        assert s['dropped'] == pytest.approx(REAL_DURATIONS['dropped'], abs=2e-4)
    assert not np.array_equal(simulate_real_durations(0), simulate_real_durations(1))

def test_stage_table_and_p4(tmp_path):
    man = dict(status='ok', profile='synthetic', started='2024-01-01T10:00:00+0100', ended='2024-01-01T10:21:00+0100',
               notebooks=[dict(notebook='00_config.ipynb', seconds=60.0, status='ok'), dict(notebook='08_train.ipynb', seconds=1100.0, status='ok')])
    df = stage_table(man)
    assert df.seconds.tolist() == [60.0, 1100.0, 100.0] and df.share.sum() == pytest.approx(1)
    save_json(tmp_path/'run/manifest.json', man)
    f, _ = p4_study(find_study(str(tmp_path/'run')))
    assert f['value'] == 1260.0 and f['met'] is False
    save_json(tmp_path/'run/manifest.json', dict(man, status='running'))
    assert p4_study(tmp_path/'run')[0]['met'] is None
    assert find_study('', root=tmp_path) is None
    with pytest.raises(FileNotFoundError, match='manifest'): find_study(str(tmp_path/'nope'))

def test_flops_and_epoch_estimate():
    import torch
    l = torch.nn.LSTM(10, 7, num_layers=2, batch_first=True)
    assert lstm_flops(l, 5) == 2 * 4 * 7 * (10 + 7) * 5 + 2 * 4 * 7 * (7 + 7) * 5
    c = count_flops('tiny', 2.0)
    assert c['total'] == c['backbone'] + c['lstm'] + c['head'] and c['frames'] == 99
    e = epoch_estimate(2e10, peak=1e14, mfu=0.25)
    assert e['epoch_train_pflop'] == pytest.approx(2e10 * 15 * 3600 * 0.986 * 3 / 1e15)
    assert e['run_hours'] == pytest.approx(30 * e['epoch_seconds'] / 3600)

def test_rss_peak_sees_an_allocation():
    with RSSPeak() as r:
        a = np.ones(40_000_000); time.sleep(0.05); del a
    assert r.delta > 250e6

def test_publish_writes_json_and_markdown(tmp_path):
    res = dict(metrics=dict(P1_overhead=figure('ours vs bare', 0.02, 0.05, unit='share', st=stats([0.01, 0.02, 0.04])),
                            P3_cache=figure('cache', None, 5.0, '>=', unit='x', note='no cache here'),
                            P5_forward=figure('forward memory', 1.2, None, unit='GB')),
               provenance=dict(time='2024-05-01T10:00:00+0000', commit='0123456789abcdef'), config=dict(profile='synthetic'),
               machine=dict(cpu='Some CPU', cores=2, torch='2.13'))
    j, md = publish_bench(res, tmp_path)
    assert json.loads(j.read_text())['metrics']['P1_overhead']['met'] is True
    text = md.read_text()
    assert text.startswith('## Latest benchmark ratios') and '2024-05-01' in text and 'Some CPU' in text
    assert '| P1_overhead |' in text and '2.0%' in text and '| yes |' in text and 'not measured' in text and 'no goal' in text
    assert not (tmp_path/'README.md').exists()

def test_threads_follow_the_load():
    from emi_nb.bench import pick_threads
    assert pick_threads(2, 0.5) == 2 and pick_threads(2, 2.5) == 1 and pick_threads(8, 8.0) == 8

def test_find_study_falls_back_to_the_newest_complete_run(tmp_path):
    from emi_nb.bench import find_study
    (tmp_path/'runs/synthetic-latest/figures').mkdir(parents=True)  # a plain folder, as notebook tests leave it
    save_json(tmp_path/'runs/synthetic-20240101-100000/manifest.json', dict(status='ok', profile='synthetic', notebooks=[]))
    save_json(tmp_path/'runs/synthetic-20240102-100000/manifest.json', dict(status='failed', profile='synthetic', notebooks=[]))
    assert find_study('', root=tmp_path).name == 'synthetic-20240101-100000'
