"""Our CLIP BPE tokenizer and towers against open_clip's (the library they stand in for, see
`models.bpe` and `models.clip_towers`): the same token ids, the same state-dict keys, the same
features on the same weights."""

from __future__ import annotations

import random

import open_clip
import pytest
import torch

from models.bpe import ClipBPE
from models.clip import ClipEncoder, KarloTokenizer
from models.configs import TINY, get_config

SAMPLES = [
    "a red circle on a blue background", "Hello, World! It's 2026 — naïve café &amp; co.",
    "  multiple   spaces\tand\nnewlines ", "emoji 🎨🖌️ and 中文 and العربية", "'s 't 're don't I'll we'd",
    "1234567 3.14159 x^2+y^2", "<start_of_text> hi <end_of_text>", "ÀÉÎÕÜ ß ﬁ ligature", "&lt;tag&gt; &amp;amp;", "",
]


def _random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-_()[]{}<>/\\@#$%^&*+=~`|"
                "éàüñçøœ€™中文字🙂\t\n")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def test_bpe_gives_open_clips_ids_and_text_back():
    ours, ref = ClipBPE(), open_clip.tokenizer.SimpleTokenizer()
    assert (ours.sot_token_id, ours.eot_token_id, ours.vocab_size) == (ref.sot_token_id, ref.eot_token_id,
                                                                       ref.vocab_size)
    for text in SAMPLES + _random_texts(500):
        ids = ours.encode(text)
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)
    assert KarloTokenizer(77)(["a red circle"]).tokens[0, :5].tolist() == [49406, *ref.encode("a red circle"), 49407]


@pytest.mark.parametrize("name", ["tiny", "default"])
def test_towers_equal_open_clips_on_the_same_weights(name):
    cfg = TINY.clip if name == "tiny" else get_config(name).clip
    torch.manual_seed(0)
    ref = open_clip.model.CLIP(**cfg.open_clip_model_cfg()).eval()
    ours = ClipEncoder(cfg).eval()
    state = {k: v for k, v in ref.state_dict().items() if k not in ("logit_scale", "logit_bias")}
    assert set(state) == set(ours.model.state_dict())  # checkpoints of either load into the other
    ours.model.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    tokens = KarloTokenizer(cfg.context_length)(["a red circle on a blue background", "", "x " * 80]).tokens
    pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
    with torch.no_grad():
        embed, seq = ours.encode_text(tokens)
        ref_seq = ref.ln_final(ref.transformer(ref.token_embedding(tokens) + ref.positional_embedding,
                                               attn_mask=ref.attn_mask))
        torch.testing.assert_close(seq, ref_seq, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(embed, ref.encode_text(tokens), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ours.encode_image(pixels), ref.encode_image(pixels), atol=1e-6, rtol=1e-5)


def test_the_runtime_imports_without_open_clip():
    import subprocess
    import sys

    code = "import sys, runtime; runtime.UnCLIP(device='cpu'); print('open_clip' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
