"""The raw request corpus in tests/requests/{valid,invalid}/NNN.http.

A .http file is text: every LF becomes CRLF on load, then backslash escapes are
decoded (\\r, \\n, \\t, \\xNN, \\\\), so control bytes and bare CR/LF can be written
visibly. A request that must not end in CRLF simply has no final newline.
Its expectations are in NNN.toml next to it:

    description = "what the file exercises"
    close = true              # the proxy closes the connection after the responses
    [[responses]]             # one per response, in order
    status = 400
    # valid corpus only, checked against the echoing origin:
    method = "GET"
    target = "/x?y=1"
    body = "hello"
"""
from __future__ import annotations

import codecs
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

CORPUS = Path(__file__).resolve().parent.parent / "requests"


@dataclass
class Case:
    name: str  # "invalid/003"
    raw: bytes
    expect: Dict

    @property
    def responses(self) -> List[Dict]:
        return self.expect.get("responses", [])


def decode(text: str) -> bytes:
    text = text.replace("\r\n", "\n").replace("\n", "\r\n")
    return codecs.escape_decode(text.encode("latin-1"))[0]


def load(kind: str) -> List[Case]:
    cases = []
    for path in sorted((CORPUS / kind).glob("*.http")):
        expect = tomllib.loads(path.with_suffix(".toml").read_text())
        cases.append(Case(f"{kind}/{path.stem}", decode(path.read_text(encoding="latin-1")), expect))
    return cases
