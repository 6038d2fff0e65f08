#!/usr/bin/env python
"""Build the tokenizer and text encoder of the embedded default model (no downloads, fixed seed).

Writes, in the layout of a diffusers CogVideoX folder:

    models/embedded-default/tokenizer/      tokenizer.json + tokenizer_config.json (T5-style Unigram)
    models/embedded-default/text_encoder/   config.json + model.safetensors (tiny T5EncoderModel)

Both are frozen at their seeded initialisation (never trained; the DiT learns to read them). The VAE and the
transformer are trained (`ttt-video toyworld train-vae`, `ttt-video train`; docs/toyworld.md) and put in
place with scripts/make_embedded_default.py.

- Tokenizer: built with the ``tokenizers`` library, the same kind of model as T5's SentencePiece
  tokenizer (Unigram, Metaspace "▁" word prefixes, "</s>" appended), with a small English vocabulary:
  every word of the storyboards in scripts/tokenizer_corpus/ plus the word list below as whole-word pieces (scored by
  log-frequency, so whole words win; each also lower-case and Capitalised, as the tokenizer is
  case-sensitive like T5's), and single characters as a fallback so any English text tokenizes. Ids:
  <pad> 0, </s> 1, <unk> 2 (as T5), then the pieces, then <end_scene>, <start_scene> (added in the
  official order, so they get the last two ids as with CogVideoX's T5 where they are 32100 / 32101).
  transformers' AutoTokenizer / T5Tokenizer(Fast) load it from the folder.
- Text encoder: T5 v1.1 layout (gated-GELU, relative position buckets), d_model 32 (= preset("tiny")
  text_embed_dim), 2 layers, 4 heads of 8, d_ff 64; its embedding already has the scene-token rows.

Run: ``python scripts/build_embedded_assets.py [--out models/embedded-default] [--check]``.
``--check`` rebuilds into a temporary folder and verifies that the committed files are identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

SEED = 20250407  # the paper's arXiv month; any fixed number works
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "models" / "embedded-default"
SCENE_END_TOKEN = "<end_scene>"
SCENE_START_TOKEN = "<start_scene>"

TEXT_ENCODER = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)

# Words a storyboard for a cartoon short is likely to use, beyond those in storyboards/.
WORD_LIST = """
a an the and or but if then than so because while when where who what which whose why how this that these
those it its he she they them their his her him we our you your i me my is are was were be been being am
has have had do does did will would can could should may might must not no yes all any some each every
both few many more most other such only own same too very just now again once here there up down in out
on off over under above below into onto through across along around behind beside between beyond near
toward towards past from to of at by for with without about against during before after since until
one two three four five six seven eight nine ten hundred first second third last next half whole
cat cats mouse mice dog dogs bird birds fish duck ducks cow horse rabbit frog bee bees spider owl fox bear
tom jerry pip dot kitten puppy animal animals creature character characters cartoon animated animation
man woman boy girl child children baby person people friend friends family owner human hand hands
head face eye eyes ear ears nose mouth teeth tongue whisker whiskers paw paws claw claws tail fur leg legs
arm arms foot feet back belly body wing wings hat shoes glasses umbrella bow tie collar
house home room kitchen living bedroom bathroom hall hallway stairs staircase door doors window windows
wall walls floor floors ceiling roof attic basement garage porch garden yard fence gate path street road
city town village park forest tree trees bush grass flower flowers leaf leaves rock rocks hill mountain
river lake pond sea ocean beach sand wave waves island boat ship train car truck bus bicycle plane sky
cloud clouds sun moon star stars rain snow wind storm lightning thunder fog ice fire smoke water mud
table chair chairs sofa couch bed pillow cushion rug carpet curtain curtains lamp light lights clock shelf
cupboard drawer box basket bag bucket barrel ladder rope stick hammer broom mop pan pot kettle stove
oven fridge refrigerator sink bowl plate plates cup cups glass bottle jar spoon fork knife tray
cheese milk bread cake pie cookie cookies apple banana sandwich soup egg eggs sausage ham fish bone
morning noon afternoon evening night day days dawn dusk sunset sunrise summer winter autumn spring
red orange yellow green blue purple pink brown black white gray grey golden silver dark bright pale
big small tiny huge little large tall short long wide narrow thin fat round flat soft hard smooth rough
warm cold hot cool wet dry clean dirty old new young happy sad angry scared surprised sleepy tired
hungry curious proud shy brave clever silly funny loud quiet calm wild gentle fast slow quick sudden
run runs running ran walk walks walking walked jump jumps jumping jumped climb climbs climbing fall
falls falling fell sit sits sitting sat stand stands standing stood lie lies lying lay sleep sleeps
sleeping slept wake wakes waking woke eat eats eating ate drink drinks drinking look looks looking
looked see sees seeing saw watch watches watching stare stares staring peek peeks hide hides hiding hid
chase chases chasing chased catch catches catching caught grab grabs grabbing hold holds holding held
carry carries carrying carried drop drops dropping dropped throw throws throwing threw push pushes
pull pulls open opens opening close closes closing slide slides sliding roll rolls rolling spin spins
fly flies flying flew swim swims swimming dance dances dancing laugh laughs laughing cry cries smile
smiles grin grins frown shout shouts scream whisper sneeze sneezes snore snores purr purrs bark barks
sniff sniffs sniffing lick licks bite bites hit hits crash crashes bump bumps break breaks broken
shake shakes shaking shiver shivers shivering tremble wave waves point points reach reaches turn turns
turning turned move moves moving moved stop stops stopped start starts begin begins end ends follow
follows following leave leaves arrive arrives enter enters escape escapes land lands lands tiptoe
tiptoes sneak sneaks creep creeps leap leaps pounce pounces dash dashes race races wobble wobbles
camera shot close closeup wide medium angle view frame scene scenes cut pan pans tilt tilts zoom zooms
track tracks tracking static slowly quickly gently suddenly pushes pulls moves follows fades fade black
foreground background left right center middle top bottom side front corner edge inside outside
style color colors colour texture lighting shadow shadows light sunlight moonlight glow glows shine
blurry blur image images deformed distorted extra fingers limbs flicker flickering watermark text
quality low high noise noisy artifacts ugly bad poor missing incorrect unrealistic unnatural warped
"""

def _corpus_words() -> Counter:
    words: Counter = Counter()
    texts = [WORD_LIST]
    # The storyboards the vocabulary was first built from, frozen here: the trained embedded default reads
    # this tokenizer's ids, so its corpus must not move when storyboards/ changes.
    for p in sorted((ROOT / "scripts" / "tokenizer_corpus").glob("*")):
        if p.suffix in (".txt", ".json", ".jsonl"):
            texts.append(p.read_text(encoding="utf-8"))
    for t in texts:
        t = t.replace(SCENE_START_TOKEN, " ").replace(SCENE_END_TOKEN, " ")
        # Words with inner apostrophes or hyphens stay whole ("Pip's", "blue-gray"). Every word also gets
        # its lower-case and Capitalised form: the tokenizer is case-sensitive like T5's.
        for w in re.findall(r"[A-Za-z0-9]+(?:['\-][A-Za-z0-9]+)*", t):
            words[w] += 1
            for form in {w.lower(), w[:1].upper() + w[1:].lower()} - {w}:
                words[form] += 0  # present, with the smoothed count of an unseen word
    return words


def build_tokenizer(out_dir: Path) -> int:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    words = _corpus_words()
    total = sum(words.values())
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -9.0)]
    seen = {v for v, _ in vocab}
    # Whole words, most frequent first (ties alphabetical, so the order is deterministic).
    for word, count in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        piece = "\u2581" + word
        if piece not in seen:
            vocab.append((piece, round(math.log((count + 1) / (total + len(words))), 4)))
            seen.add(piece)
    # Fallback pieces: characters and a few English suffixes, scored low so whole words win.
    fallback = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()[]/&%$#@*+=_~")
    fallback += ["s", "es", "ed", "ing", "ly", "er", "est", "'s", "n't", "tion"]
    for p in fallback:
        for piece, score in ((p, -14.0), ("\u2581" + p, -13.0)):
            if piece not in seen:
                vocab.append((piece, score))
                seen.add(piece)

    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    # No normalizer: transformers' T5Tokenizer rebuilds the normalizer from the (absent) SentencePiece
    # charsmap, so one stored here would be dropped on load and the two paths would disagree.
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)]
    )
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    special = ["<pad>", "</s>", "<unk>", SCENE_END_TOKEN, SCENE_START_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    eos_id = tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", eos_id)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": 226,
        "pad_token": "<pad>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "extra_ids": 0,
        "additional_special_tokens": [SCENE_END_TOKEN, SCENE_START_TOKEN],
        "clean_up_tokenization_spaces": False,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    special_map = {k: config[k] for k in ("pad_token", "eos_token", "unk_token", "additional_special_tokens")}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, sort_keys=True) + "\n")
    return tok.get_vocab_size(with_added_tokens=True)


def build_text_encoder(out_dir: Path, vocab_size: int) -> None:
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=TEXT_ENCODER["d_model"],
        d_kv=TEXT_ENCODER["d_kv"],
        d_ff=TEXT_ENCODER["d_ff"],
        num_layers=TEXT_ENCODER["num_layers"],
        num_decoder_layers=TEXT_ENCODER["num_layers"],
        num_heads=TEXT_ENCODER["num_heads"],
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(SEED)
    model = T5EncoderModel(config).eval()
    # transformers' T5 init is seeded above, but make the embedding explicit and version-independent.
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb.copy_(torch.randn(emb.shape, generator=g))
    model.save_pretrained(str(out_dir), safe_serialization=True)


def build(out: Path) -> dict[str, str]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Stage next to the target so the final moves are same-filesystem renames.
    staging = Path(tempfile.mkdtemp(prefix=".embedded-assets-", dir=out.parent))
    try:
        vocab_size = build_tokenizer(staging / "tokenizer")
        build_text_encoder(staging / "text_encoder", vocab_size)
        digests = _digests(staging)
        out.mkdir(parents=True, exist_ok=True)
        for sub in ("tokenizer", "text_encoder"):
            target = out / sub
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / sub, target)
        return digests
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _digests(folder: Path) -> dict[str, str]:
    result = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            result[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model folder (default: %(default)s)")
    ap.add_argument("--check", action="store_true", help="rebuild in a temp folder and compare with --out")
    args = ap.parse_args(argv)
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = build(Path(tmp) / "m")
        existing = {k: v for k, v in _digests(args.out).items() if k.split("/")[0] in ("tokenizer", "text_encoder")}
        if fresh != existing:
            diff = sorted(set(fresh.items()) ^ set(existing.items()))
            print("embedded assets differ from a fresh build:", *diff, sep="\n  ")
            return 1
        print(f"embedded assets match a fresh build ({len(fresh)} files)")
        return 0
    digests = build(args.out)
    total = sum((args.out / k).stat().st_size for k in digests)
    for k in digests:
        print(f"{(args.out / k).stat().st_size:>10,d}  {k}")
    print(f"{total:>10,d}  bytes in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
