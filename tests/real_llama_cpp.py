"""A real llama.cpp for tests: the npm package node-llama-cpp (prebuilt binaries), installed once into the
cache, and a greedy generator over it. Tests that need it skip, saying why, where it cannot be installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

VERSION = "3.22.1"
SCRIPT = r"""
import {getLlama, LlamaLogLevel} from "node-llama-cpp";
const [modelPath, requestPath] = process.argv.slice(2);
const req = JSON.parse((await import("node:fs")).readFileSync(requestPath, "utf8"));
const llama = await getLlama({gpu: false, build: "never", logLevel: LlamaLogLevel.error});
const model = await llama.loadModel({modelPath});
const out = {generated: [], tokenized: []};
for (const ids of req.prompts) {
  // threads: the cores this process may use (more threads than cores spin and slow it a hundredfold)
  const context = await model.createContext({contextSize: 512, threads: req.threads});
  const seq = context.getSequence();
  const got = [];
  for await (const t of seq.evaluate(ids, {temperature: 0})) {
    got.push(t);
    if (got.length >= req.n || t === req.eos) break;
  }
  out.generated.push(got);
  await context.dispose();
}
for (const text of req.texts ?? []) out.tokenized.push(Array.from(model.tokenize(text, true)));
console.log(JSON.stringify(out));
"""


def install() -> Path:
    """The folder node-llama-cpp is installed in (with the script beside it), or pytest.skip saying why."""
    where = Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith")) / f"node-llama-cpp-{VERSION}"
    if not (where / "node_modules" / "node-llama-cpp").exists():
        if not shutil.which("node") or not shutil.which("npm"):
            pytest.skip("llama.cpp check skipped: node and npm are not installed (node-llama-cpp needs them)")
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", f"node-llama-cpp@{VERSION}"],
                              cwd=where, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"llama.cpp check skipped: npm install node-llama-cpp@{VERSION} failed: {done.stderr[-500:]}")
    (where / "greedy.mjs").write_text(SCRIPT, encoding="utf-8")
    return where


def greedy(gguf: Path, prompts: list[list[int]], n: int, eos: int, texts: list[str] = ()) -> dict:
    """llama.cpp's greedy continuation (up to n tokens; it stops before an end-of-generation token, so
    compare with `without_eos`) of each prompt's ids, and its tokenization of each text (special tokens
    parsed)."""
    where = install()
    request = where / f"request-{os.getpid()}.json"
    request.write_text(json.dumps({"prompts": prompts, "n": n, "eos": eos, "texts": list(texts),
                                   "threads": len(os.sched_getaffinity(0))}), encoding="utf-8")
    done = subprocess.run(["node", "greedy.mjs", str(Path(gguf).resolve()), str(request)], cwd=where,
                          capture_output=True, text=True, timeout=600)
    request.unlink(missing_ok=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def without_eos(ids: list[int], eos: int) -> list[int]:
    """A generation up to its first EOS, which llama.cpp does not hand out."""
    return ids[: ids.index(eos)] if eos in ids else ids
