"""Captioning through the shared trainer on a tiny real fashion_scenes dataset: pipeline ops,
outputs (results, COCO-format captions and references, vocabulary), resume, attention pictures."""

import importlib.util
import json
import os

import pytest

from seqvis.evaluation.caption_metrics import bleu, cider_d, rouge_l
from seqvis.data import pipeline as data_lib
from seqvis.train import checkpoint as ckpt_lib
from seqvis.tasks.captioning import CaptioningTask, evaluate_workdir
from seqvis.errors import ConfigError, VocabularyError
from seqvis.trainer import train_and_evaluate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_TRAIN, N_TEST = 48, 16


def load_config(arg):
    spec = importlib.util.spec_from_file_location("captioning_cfg", os.path.join(REPO, "configs", "captioning.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("scenes"))


def tiny(data_dir, arg="show_attend_tell", **kw):
    c = load_config(arg)
    c.data.data_dir = data_dir
    c.data.builder_kwargs.update(num_train=N_TRAIN, num_test=N_TEST)
    c.model.encoder.update(stage_sizes=(1, 1, 1), width=8)
    for field in ("embed_dim", "hidden_dim", "attention_dim", "width", "mlp_dim"):
        if field in c.model:
            c.model[field] = 16
    c.batch_size = c.eval_batch_size = c.decode.batch_size = 16
    c.total_steps, c.num_epochs = 4, 0.0
    c.schedule.warmup_steps = 0
    c.log_every_steps = c.checkpoint_every_steps = 2
    c.async_checkpointing = False
    c.progress = False
    c.update(kw)
    return c


def test_pipeline_ops_tokenise_the_references(data_dir, tmp_path):
    config = tiny(data_dir)
    task = CaptioningTask(config)
    task.setup(str(tmp_path))
    builder = data_lib.get_builder(config.data)
    refs = {int(ex["image_id"]): [c.decode() for c in ex["captions"]]
            for ex in builder.as_dataset(split="train").as_numpy_iterator()}
    # The vocabulary is exactly the words of the training captions (independent count).
    words = sorted({w for rs in refs.values() for r in rs for w in r.split()})
    assert sorted(task.tokenizer.itos[4:]) == words
    tok = task.tokenizer
    train_ops = tuple(task.pp_ops(train=True))
    it = data_lib.train_iterator(config.data, global_batch_size=16, seed=0, local_device_count=1, extra_ops=train_ops)
    seen = 0
    for _ in range(3):
        batch = next(it)
        assert set(batch) == {"image", "tokens", "mask"} and batch["tokens"].shape == (1, 16, config.captions.max_len)
        for row in batch["tokens"][0]:
            # one of the example's references; which one depends on the example's seed
            assert any(tok.encode(r, config.captions.max_len) == row.tolist() for rs in refs.values() for r in rs)
            seen += 1
    assert seen == 48
    ev = next(data_lib.eval_iterator(config.data, global_batch_size=16, local_device_count=1, split="train",
                                     extra_ops=tuple(task.pp_ops(train=False))))
    for i, row in zip(ev["image_id"][0], ev["tokens"][0]):
        assert row.tolist() == [tok.encode(r, config.captions.max_len) for r in refs[int(i)]]


def test_end_to_end_outputs_resume_and_pictures(data_dir, tmp_path):
    from seqvis.analysis import attention_maps as am

    workdir = str(tmp_path / "run")
    config = tiny(data_dir)
    results = train_and_evaluate(config, workdir)
    for key in ("bleu1", "bleu2", "bleu3", "bleu4", "cider", "rouge_l", "grounding", "grounding_colour",
                "item_word_precision", "nll", "token_accuracy", "attention_reg", "greedy_bleu4", "greedy_cider",
                "greedy_rouge_l", "greedy_grounding", "beam_bleu4", "beam_cider", "beam_rouge_l", "beam_grounding"):
        assert key in results, key
    assert results["num_examples"] == N_TEST and results["num_captions"] == N_TEST
    on_disk = json.load(open(os.path.join(workdir, "results.json")))
    assert on_disk["bleu4"] == pytest.approx(results["beam_bleu4"])
    assert on_disk["rouge_l"] == pytest.approx(results["beam_rouge_l"])
    # COCO results / annotation files, re-scored independently from the files.
    cands = json.load(open(os.path.join(workdir, "captions_test.json")))
    greedy = json.load(open(os.path.join(workdir, "captions_test_greedy.json")))
    refs = json.load(open(os.path.join(workdir, "captions_refs.json")))
    assert sorted(c["image_id"] for c in cands) == list(range(N_TEST))
    assert all(isinstance(c["caption"], str) for c in cands)
    assert [im["id"] for im in refs["images"]] == list(range(N_TEST)) and len(refs["annotations"]) == 5 * N_TEST
    ref_map = {}
    for a in refs["annotations"]:
        ref_map.setdefault(a["image_id"], []).append(a["caption"])
    for name, rows, prefix in (("beam", cands, "beam_"), ("greedy", greedy, "greedy_")):
        c = {r["image_id"]: [r["caption"]] for r in rows}
        b = bleu(c, ref_map)
        assert results[prefix + "bleu4"] == pytest.approx(b[3], abs=1e-9), name
        assert results[prefix + "cider"] == pytest.approx(cider_d(c, ref_map)[0], abs=1e-9), name
        assert results[prefix + "rouge_l"] == pytest.approx(rouge_l(c, ref_map)[0], abs=1e-9), name
    test_builder = data_lib.get_builder(config.data)
    truth = {int(ex["image_id"]): [x.decode() for x in ex["captions"]]
             for ex in test_builder.as_dataset(split="test").as_numpy_iterator()}
    assert ref_map == truth

    # The vocabulary lives in the workdir and is what a resumed run uses.
    vocab_path = os.path.join(workdir, "vocab.json")
    before = open(vocab_path).read()
    config.total_steps = 6
    results2 = train_and_evaluate(config, workdir)
    assert results2["steps"] == 6 and open(vocab_path).read() == before
    assert sorted(ckpt_lib.Checkpointer(workdir).steps())[-1] == 6

    # Re-evaluating the final checkpoint reproduces the scores written at the end of training.
    again = evaluate_workdir(workdir)
    for key in ("beam_bleu4", "beam_cider", "beam_rouge_l", "greedy_bleu4", "greedy_cider", "greedy_rouge_l",
                "grounding", "grounding_colour"):
        assert again[key] == pytest.approx(results2[key], abs=1e-9), key

    # Attention pictures from the checkpoint: one PNG per image.
    paths = am.render_workdir(workdir, num_images=2)
    assert len(paths) == 2 and all(os.path.getsize(p) > 1000 for p in paths)

    # Checkpoints without their vocabulary: refuse, with the fix in the message.
    os.remove(vocab_path)
    with pytest.raises(VocabularyError, match="vocab.json is missing"):
        train_and_evaluate(config, workdir)


def test_config_errors_name_the_field(data_dir, tmp_path):
    for field, value, match in (("decode.beam_size", 0, "config.decode.beam_size=0"),
                                ("model.name", "lstm", "config.model.name='lstm'"),
                                ("captions.max_len", 2, "config.captions.max_len=2"),
                                ("model.encoder.name", "vgg", "config.model.encoder.name")):
        c = tiny(data_dir)
        head, _, last = field.rpartition(".")
        node = c
        for part in head.split("."):
            node = node[part]
        node[last] = value
        with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
            train_and_evaluate(c, str(tmp_path / "bad"))
    c = tiny(data_dir)
    c.model.width = 3  # a transformer field on an LSTM model
    with pytest.raises(ConfigError, match=r"field\(s\) \['width'\]"):
        train_and_evaluate(c, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")
