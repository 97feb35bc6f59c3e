"""The `tokenizer` stage (instructrl/stages/tokenizer.py) and the tokenizer CLI's split_digits."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from instructrl.tokenizer import Tokenizer
from tests.conftest import REPO


def test_stage_split_digits_option(tmp_path):
    """Stage `tokenizer` with `split_digits=False` lets BPE merge frequent numbers into one
    piece (the tiny experiment's setting); the default keeps one piece per digit."""
    import ml_collections

    from instructrl.stages import tokenizer as tokenizer_stage

    text = tmp_path / "numbers.txt"
    rng = random.Random(0)
    text.write_text(
        "\n".join(f"add {rng.randint(10, 29)} and {rng.randint(10, 29)}" for _ in range(400)),
        encoding="utf-8",
    )
    for split, want in ((True, [" ", "1", "7"]), (False, [" 17"])):
        c = tokenizer_stage.default_config()
        c.update(vocab_size=320, input=str(text), split_digits=split)
        workdir = str(tmp_path / f"split_{split}")
        tokenizer_stage.run(ml_collections.ConfigDict(dict(tok=c)), "tok", workdir)
        tok = Tokenizer.load(os.path.join(workdir, "tok", "tokenizer.model"))
        pieces = [tok.id_to_piece(i).replace("\u2581", " ") for i in tok.encode("add 17")]
        assert pieces[-len(want) :] == want, (split, pieces)
        # the CLI's --split_digits / --no-split_digits give the same pieces
        flag = "--split_digits" if split else "--no-split_digits"
        out = tmp_path / f"cli_{split}" / "tok"
        proc = subprocess.run(
            [sys.executable, "-m", "instructrl.tokenizer", "train", f"--input={text}",
             "--vocab_size=320", f"--out={out}", flag],
            env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        cli = Tokenizer.load(f"{out}.model")
        assert [cli.id_to_piece(i) for i in cli.encode("add 17")] == [
            tok.id_to_piece(i) for i in tok.encode("add 17")
        ]
