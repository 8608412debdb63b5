"""Long-video needle in a haystack (eval/niah.py): the procedural data, the CLI's files, and distributed
evaluation (ring=2 and ulysses=2 on gloo) against one process.

The model is untrained here (answers are chance), so the distributed check compares the scores of the
ten digit tokens, not only the argmax, with the one-process scores.
"""
import json

import pytest
import torch
from dist_pool import groups_for

from longvila_engine import ParallelLayout
from longvila_engine.eval import niah

LENGTHS, DEPTHS, TRIALS = [4, 9], [0.0, 1.0], 2  # 9 frames over 2 ranks: an uneven frame split


POOL_WORLD_SIZE = 2  # the session pool of this size (tests/conftest.py)


def test_haystack_is_deterministic_and_smooth():
    a, b = niah.make_haystack(12, seed=5), niah.make_haystack(12, seed=5)
    assert a.shape == (12, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, niah.make_haystack(12, seed=6))
    assert float(a.abs().max()) <= 1.2 < niah.NEEDLE_LEVEL  # the needle's levels never occur in the noise
    # smooth in space: neighbouring pixels differ far less than the value range
    assert float((a[..., 1:] - a[..., :-1]).abs().mean()) < 0.1 * float(a.abs().max())


def test_needles_are_distinct_digits():
    needles = torch.stack([niah.render_needle(d) for d in range(10)])
    assert needles.shape == (10, 3, 16, 16)
    flat = needles.flatten(1)
    assert all(not torch.equal(flat[i], flat[j]) for i in range(10) for j in range(i))
    eight = niah.render_needle(8)
    assert bool(((eight == niah.NEEDLE_LEVEL).all(0)).sum() > ((niah.render_needle(1) == niah.NEEDLE_LEVEL)
                                                               .all(0)).sum())  # 8 lights the most segments
    assert torch.equal(niah.render_needle(3, size=32)[:, ::2, ::2], niah.render_needle(3))
    with pytest.raises(ValueError):
        niah.render_needle(10)


@pytest.mark.parametrize("frames,depth,want", [(10, 0.0, 0), (10, 1.0, 9), (10, 0.5, 4), (33, 0.25, 8), (1, 0.7, 0)])
def test_needle_is_where_it_should_be(frames, depth, want):
    ids, video, index, answer = niah.make_sample(frames, depth, digit=7, seed=3)
    assert index == want == niah.needle_index(frames, depth)
    hay = niah.make_haystack(frames, seed=3)
    differs = (video != hay).flatten(1).any(1)
    assert differs.nonzero().flatten().tolist() == [want]  # only the needle frame was replaced
    assert torch.equal(video[want], niah.render_needle(7))
    assert answer == niah.DIGIT_TOKENS[7] == ord("7")
    assert int((ids == niah.IMAGE_TOKEN).sum()) == frames
    assert ids[0] == niah.BOS and ids[-len(niah.QUESTION):].tolist() == list(niah.QUESTION)


def _check_rows(rows):
    assert len(rows) == len(LENGTHS) * len(DEPTHS)
    for r in rows:
        assert {"frames", "tokens", "depth", "correct", "trials", "accuracy", "answers", "expected"} <= set(r)
        assert r["tokens"] == 1 + len(niah.QUESTION) + 4 * r["frames"]  # 4 visual tokens per frame
        assert r["trials"] == TRIALS and 0 <= r["correct"] <= TRIALS
        assert r["needle_index"] == niah.needle_index(r["frames"], r["depth"])


def test_haystack_goes_through_an_mp4_and_the_data_path(tmp_path):
    ids, video, index, _ = niah.make_sample(9, 0.5, digit=3, seed=4)
    path = str(tmp_path / "hay.mp4")
    niah.write_sample_video(video, path)
    back = niah.read_sample_video(path, 9)  # PyAV decoding, all 9 frames sampled
    assert back.shape == video.shape and back.dtype == torch.float32
    # Lossless RGB H.264: only the 8-bit quantisation of [-1.5, 1.5] is lost (half a step: 1.5/255).
    assert float((back - video).abs().max()) <= 1.5 / 255 + 1e-6
    assert torch.equal(back[index], niah.render_needle(3))  # the needle's levels are 0 and 255: exact
    assert torch.equal(niah.read_sample_video(path, 3), back[[0, 4, 8]])  # uniform sampling


def test_tiny_eval_writes_json_and_png(tmp_path):
    out_json, out_png = tmp_path / "niah.json", tmp_path / "niah.png"
    argv = ["--lengths", ",".join(map(str, LENGTHS)), "--depths", ",".join(map(str, DEPTHS)), "--trials",
            str(TRIALS), "--backend", "reference", "--json", str(out_json), "--png", str(out_png), "--video-dir",
            str(tmp_path / "videos")]
    assert niah.main(argv) == 0
    assert len(list((tmp_path / "videos").glob("haystack_*.mp4"))) == len(LENGTHS) * len(DEPTHS) * TRIALS
    data = json.loads(out_json.read_text())
    assert data["lengths"] == LENGTHS and data["depths"] == DEPTHS
    _check_rows(data["cells"])
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 1000


def test_short_training_run_saves_a_loadable_model(tmp_path):
    path = tmp_path / "m.pt"
    assert niah.main(["--train", "--steps", "2", "--batch", "2", "--train-max-frames", "3", "--save", str(path)]) == 0
    state = torch.load(path, weights_only=True)
    model = niah.build_model(seed=1)
    model.load_state_dict(state["model"])
    assert state["train_max_frames"] == 3


def _grid(layout):
    groups = None if layout is None else groups_for(layout)
    model = niah.build_model(groups, backend="reference")
    return niah.run_grid(model, LENGTHS, DEPTHS, TRIALS, keep_logits=True)


def _cli(layout_args, path):
    return niah.main([*layout_args, "--lengths", ",".join(map(str, LENGTHS)), "--depths",
                      ",".join(map(str, DEPTHS)), "--trials", str(TRIALS), "--backend", "reference", "--json", path])


@pytest.mark.parametrize("layout", [ParallelLayout(ring=2), ParallelLayout(ulysses=2)], ids=["ring2", "ulysses2"])
def test_distributed_eval_matches_one_process(pool, layout):
    want = _grid(None)
    got = pool.run(_grid, layout)
    for rank_rows in got:
        _check_rows(rank_rows)
        for g, w in zip(rank_rows, want):
            assert g["answers"] == w["answers"] and g["tokens"] == w["tokens"]
            torch.testing.assert_close(torch.tensor(g["digit_logits"]), torch.tensor(w["digit_logits"]),
                                       rtol=1e-4, atol=1e-5)


def test_cli_under_two_ranks_writes_the_same_answers(pool, tmp_path):
    one, two = str(tmp_path / "one.json"), str(tmp_path / "two.json")
    assert _cli([], one) == 0
    assert pool.run(_cli, ["--ring", "2"], two) == [0, 0]
    a, b = json.loads(open(one).read()), json.loads(open(two).read())
    assert b["ring"] == 2
    assert [c["answers"] for c in a["cells"]] == [c["answers"] for c in b["cells"]]
