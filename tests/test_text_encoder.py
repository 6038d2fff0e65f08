"""SegmentTextEncoder: loading, scene tokens, padding/truncation, float64 reference, on-disk cache."""

import json
import os
import random
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from ttt_video.ttt_core.config import preset
from ttt_video.ttt_core.text_encoder import NEW_ROW_SEED, SegmentTextEncoder, TextTruncationWarning

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "models" / "embedded-default"


def _random_texts(n, rng, min_words=3, max_words=12):
    words = [w[0] for w in json.loads((EMBEDDED / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]]
    words = [w[1:] for w in words if w.startswith("\u2581") and len(w) > 2]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words))) + "." for _ in range(n)]


def _reference_embeddings(model_dir, texts, max_length):
    """Independent path: the raw `tokenizers` file, hand padding to max_length, T5 in float64."""
    from tokenizers import Tokenizer
    from transformers import T5EncoderModel

    tok = Tokenizer.from_file(str(model_dir / "tokenizer" / "tokenizer.json"))
    pad, eos = tok.token_to_id("<pad>"), tok.token_to_id("</s>")
    rows = []
    for t in texts:
        ids = tok.encode(t).ids  # ends with </s>
        if len(ids) > max_length:
            ids = ids[: max_length - 1] + [eos]
        rows.append(ids + [pad] * (max_length - len(ids)))
    model = T5EncoderModel.from_pretrained(str(model_dir / "text_encoder"), local_files_only=True).double().eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(rows)).last_hidden_state


@pytest.fixture(scope="module")
def encoder():
    return SegmentTextEncoder.from_pretrained(EMBEDDED, device="cpu", dtype=torch.float32)


def test_embedded_encoder_matches_float64_reference(encoder):
    rng = random.Random(os.urandom(8))
    texts = _random_texts(4, rng)
    texts[1] = "<start_scene>" + texts[1]
    texts[2] = texts[2] + "<end_scene>"
    assert encoder.dim == preset("tiny").text_embed_dim == 32
    assert encoder.added_tokens == []  # the embedded tokenizer already has both scene tokens
    emb = encoder.encode(texts, max_length=40)
    assert emb.shape == (4, 40, 32) and emb.dtype == torch.float32
    ref = _reference_embeddings(EMBEDDED, texts, 40)
    torch.testing.assert_close(emb.double(), ref, rtol=1e-5, atol=1e-5, msg=f"texts={texts}")
    # padding is encoded too (no attention mask), so the padded tail is not constant zeros
    assert emb[0, -1].abs().sum() > 0
    assert encoder.last_truncated == []


def test_scene_tokens_are_single_special_tokens(encoder):
    ids = encoder.tokenizer("<start_scene>A cat.<end_scene>")["input_ids"]
    end_id, start_id = encoder.tokenizer.convert_tokens_to_ids(["<end_scene>", "<start_scene>"])
    assert ids[0] == start_id and ids[-2] == end_id and ids[-1] == encoder.tokenizer.eos_token_id
    assert end_id < start_id  # added in the official order: end first
    assert encoder.count_tokens("<start_scene>A cat.<end_scene>") == len(ids)


def test_truncation_is_reported(encoder):
    rng = random.Random(os.urandom(8))
    short, long = _random_texts(1, rng, 2, 3)[0], _random_texts(1, rng, 30, 40)[0]
    n_long = encoder.count_tokens(long)
    assert n_long > 16
    with pytest.warns(TextTruncationWarning, match=rf"segment 2: {n_long} tokens \({n_long - 16} cut\)"):
        emb = encoder.encode([short, long], max_length=16)
    assert encoder.last_truncated == [(1, n_long)]
    ref = _reference_embeddings(EMBEDDED, [short, long], 16)
    torch.testing.assert_close(emb.double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="segment 2"):
        encoder.encode([short, long], max_length=16, on_overflow="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder.encode([short], max_length=16)  # no warning when it fits


def _tiny_folder_without_scene_tokens(tmp_path):
    """A CogVideoX-style folder whose tokenizer lacks the scene tokens and whose embedding has no spare rows."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5Config, T5EncoderModel

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -5.0)]
    vocab += [("\u2581" + w, -3.0) for w in "a cat mouse runs sleeps the table".split()]
    vocab += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz."]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "</s>", "<unk>")])
    tok.post_processor = processors.TemplateProcessing(single=["$A", "</s>"], special_tokens=[("</s>", 1)])
    root = tmp_path / "model"
    (root / "tokenizer").mkdir(parents=True)
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    (root / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0, "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"})
    )
    cfg = T5Config(vocab_size=len(vocab), d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1, feed_forward_proj="gated-gelu")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    T5EncoderModel(cfg).save_pretrained(str(root / "text_encoder"))
    return root, len(vocab)


def test_missing_scene_tokens_added_with_deterministic_rows(tmp_path):
    root, base = _tiny_folder_without_scene_tokens(tmp_path)
    a = SegmentTextEncoder.from_pretrained(root, lazy=False)
    b = SegmentTextEncoder.from_pretrained(root, lazy=False)
    assert a.added_tokens == ["<end_scene>", "<start_scene>"]
    assert a.tokenizer.convert_tokens_to_ids(["<end_scene>", "<start_scene>"]) == [base, base + 1]
    wa = a._model.get_input_embeddings().weight
    wb = b._model.get_input_embeddings().weight
    assert wa.shape[0] == base + 2
    torch.testing.assert_close(wa, wb, rtol=0, atol=0)  # same rows on every load
    assert not torch.equal(wa[base], wa[base + 1])
    from transformers import T5EncoderModel

    orig = T5EncoderModel.from_pretrained(str(root / "text_encoder")).get_input_embeddings().weight
    torch.testing.assert_close(wa[:base], orig, rtol=0, atol=0)  # existing rows untouched
    # rows from the documented seed, scaled to the existing rows' statistics
    g = torch.Generator().manual_seed(NEW_ROW_SEED)
    expect = torch.randn(2, orig.shape[1], generator=g) * orig.std() + orig.mean()
    torch.testing.assert_close(wa[base:], expect)

    texts = ["the cat<end_scene>", "<start_scene>a mouse runs"]
    emb = a.encode(texts, max_length=8)
    saved = tmp_path / "saved"
    a.save_pretrained(saved)
    c = SegmentTextEncoder.from_pretrained(saved)
    assert c.added_tokens == []  # stored with the model now
    torch.testing.assert_close(c.encode(texts, max_length=8), emb, rtol=0, atol=0)
    assert list((saved / "text_encoder").glob("*.safetensors"))


def test_encode_cached(tmp_path):
    enc = SegmentTextEncoder.from_pretrained(EMBEDDED)  # lazy: nothing loaded yet
    assert not enc.loaded
    rng = random.Random(os.urandom(8))
    texts = _random_texts(3, rng)
    texts.append(texts[0])  # a repeated prompt is encoded once
    cache = tmp_path / "cache"
    first = enc.encode_cached(texts, cache, max_length=24)
    assert enc.loaded
    files = sorted(cache.rglob("*.safetensors"))
    assert len(files) == 3
    assert not list(cache.rglob("*.tmp"))  # atomic writes leave no temp files
    torch.testing.assert_close(first, _reference_embeddings(EMBEDDED, texts, 24).float(), rtol=1e-5, atol=1e-5)

    enc.free()
    assert not enc.loaded
    again = enc.encode_cached(texts, cache, max_length=24)
    assert not enc.loaded  # all hits: the T5 weights were never read
    torch.testing.assert_close(again, first, rtol=0, atol=0)

    # another budget is another key; a corrupt entry is recomputed and replaced
    enc.encode_cached(texts[:1], cache, max_length=12, on_overflow="ignore")
    assert len(sorted(cache.rglob("*.safetensors"))) == 4
    victim = enc.cache_path(cache, texts[1], 24)
    victim.write_bytes(b"not a safetensors file")
    redo = enc.encode_cached(texts, cache, max_length=24)
    torch.testing.assert_close(redo, first, rtol=0, atol=0)
    from safetensors.torch import load_file

    assert load_file(str(victim))["embedding"].shape == (24, 32)


def test_model_identity_follows_the_files(tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(EMBEDDED / "tokenizer", copy / "tokenizer")
    shutil.copytree(EMBEDDED / "text_encoder", copy / "text_encoder")
    a = SegmentTextEncoder.from_pretrained(copy).model_id
    assert SegmentTextEncoder.from_pretrained(copy).model_id == a
    cfg = json.loads((copy / "text_encoder" / "config.json").read_text())
    cfg["layer_norm_epsilon"] = 1e-5
    (copy / "text_encoder" / "config.json").write_text(json.dumps(cfg))
    assert SegmentTextEncoder.from_pretrained(copy).model_id != a


def test_refuses_pickled_weights_and_missing_folders(tmp_path):
    root = tmp_path / "m"
    shutil.copytree(EMBEDDED / "tokenizer", root / "tokenizer")
    (root / "text_encoder").mkdir()
    shutil.copy(EMBEDDED / "text_encoder" / "config.json", root / "text_encoder")
    (root / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*safetensors"):
        SegmentTextEncoder.from_pretrained(root)
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        SegmentTextEncoder.from_pretrained(tmp_path / "nowhere")


def test_bundled_storyboards_fit_a_64_token_budget(encoder):
    from ttt_video.ttt_core.storyboard import load_storyboard, validate

    for name in ("one_minute.txt", "preview_9s.txt", "example_features.txt", "example_official.json"):
        sb = load_storyboard(ROOT / "storyboards" / name)
        assert validate(sb, encoder.count_tokens, max_tokens=64) == []
        unk = encoder.tokenizer.unk_token_id
        assert all(unk not in encoder.tokenizer(p)["input_ids"] for p in sb.prompts())


def test_cogvideox_style_folder_uses_existing_rows(tmp_path):
    """Like CogVideoX's T5: a SentencePiece spiece.model + 100 extra ids (here 200 + 100 = 300 ids) and
    an embedding padded past the vocabulary (here 328 rows, as 32,128 for 32,100). The scene tokens get
    the next two ids (300, 301 ~ 32100, 32101) and use the checkpoint's existing rows: nothing resized."""
    import io

    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel

    text = (ROOT / "storyboards" / "example_features.txt").read_text()
    sentences = [s.strip() for s in text.replace("\n", " ").split(".") if s.strip() and not s.startswith("#")]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 3), model_writer=buf, vocab_size=200, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2,
    )  # fmt: skip
    root = tmp_path / "cogvideox"
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "spiece.model").write_bytes(buf.getvalue())
    (root / "tokenizer" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 226,
         "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))  # fmt: skip
    cfg = T5Config(vocab_size=328, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1, feed_forward_proj="gated-gelu")
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))
    T5EncoderModel(cfg).save_pretrained(str(root / "text_encoder"))

    enc = SegmentTextEncoder.from_pretrained(root, lazy=False)
    assert enc.added_tokens == ["<end_scene>", "<start_scene>"]
    assert enc.tokenizer.convert_tokens_to_ids(["<end_scene>", "<start_scene>"]) == [300, 301]
    weight = enc._model.get_input_embeddings().weight
    orig = T5EncoderModel.from_pretrained(str(root / "text_encoder")).get_input_embeddings().weight
    assert weight.shape == (328, 16)
    torch.testing.assert_close(weight, orig, rtol=0, atol=0)

    texts = ["The cat sleeps.<end_scene>", "<start_scene>Dot runs across the table."]
    emb = enc.encode(texts, max_length=20)
    ids = enc.tokenizer(texts, padding="max_length", max_length=20, truncation=True, return_tensors="pt")["input_ids"]
    assert ids[0].tolist().count(300) == 1 and ids[1, 0] == 301
    ref_model = T5EncoderModel.from_pretrained(str(root / "text_encoder")).double().eval()
    with torch.no_grad():
        ref = ref_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(emb.double(), ref, rtol=1e-5, atol=1e-5)


def test_embedded_assets_are_reproducible(tmp_path, load_script):
    """scripts/build_embedded_assets.py is deterministic: a fresh build equals the committed files
    (tensors exactly, tokenizer files byte for byte, configs up to library version stamps)."""
    from safetensors.torch import load_file

    mod = load_script("scripts/build_embedded_assets.py")
    fresh = tmp_path / "m"
    digests = mod.build(fresh)
    assert set(digests) == {
        "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
        "text_encoder/config.json", "text_encoder/model.safetensors",
    }  # fmt: skip
    total = 0
    for rel in digests:
        a, b = fresh / rel, EMBEDDED / rel
        total += b.stat().st_size
        if rel.endswith(".safetensors"):
            ta, tb = load_file(str(a)), load_file(str(b))
            assert ta.keys() == tb.keys()
            for k in ta:
                torch.testing.assert_close(ta[k], tb[k], rtol=0, atol=0, msg=f"{rel}:{k}")
        elif rel.endswith("config.json") and not rel.startswith("tokenizer/"):
            strip = lambda d: {k: v for k, v in d.items() if not k.endswith("_version")}  # noqa: E731
            assert strip(json.loads(a.read_text())) == strip(json.loads(b.read_text())), rel
        else:
            assert a.read_bytes() == b.read_bytes(), rel
    assert total < 3 * 1024 * 1024  # "a few MB at most"
