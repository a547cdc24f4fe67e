"""What a hostile or careless user can hand autoquant, and what must happen: one clear error of
the right kind (or, for a damaged cache, a clean regeneration), no traceback, nothing modified,
within seconds. ``tests/test_bad_inputs.py`` runs every case; ``bench/bad_inputs.py`` counts them.

A case is a function ``run(ctx)`` that does what the user would do and returns an
:class:`Outcome`; the helpers below turn "call the API / the CLI and expect an error" into one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable

import yaml

RECIPE = "format: autoquant-recipe/1\n"
TINY = "tiny-flux"
Q0 = "transformer.transformer_blocks.0.attn.to_q"


@dataclasses.dataclass
class Outcome:
    clear: bool  # the error of the expected kind, with the expected words, no traceback
    untouched: bool  # the model and the user's files as they were
    message: str
    seconds: float = 0.0


@dataclasses.dataclass
class Case:
    id: str
    kind: str
    run: Callable[["Ctx"], Outcome]


class Ctx:
    """One run of the catalogue: a temp folder, a tiny pipeline, a saved folder and a study to
    damage, made once and copied per case."""

    def __init__(self, tmp: Path):
        import autoquant

        self.tmp = tmp
        self.autoquant = autoquant
        self.pipe = autoquant.load_pipeline(TINY, dtype="auto")
        self._saved: Path | None = None
        self._study: Path | None = None
        self.n = 0

    def fresh(self):
        """A new base pipeline (a case that wrongly succeeded must not spoil the next)."""
        self.pipe = self.autoquant.load_pipeline(TINY, dtype="auto")
        return self.pipe

    def path(self, name: str) -> Path:
        self.n += 1
        p = self.tmp / f"c{self.n}" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write(self, name: str, text: str | bytes) -> Path:
        p = self.path(name)
        (p.write_bytes if isinstance(text, bytes) else p.write_text)(text)
        return p

    # -- a saved folder to damage -------------------------------------------------------------
    def saved(self) -> Path:
        if self._saved is None:
            a = self.autoquant
            pipe = a.load_pipeline(TINY, dtype="auto")
            recipe = a.Recipe.from_dict(yaml.safe_load(RECIPE + """
components: [transformer]
default: {method: hqq, bits: 4, group_size: 32}
layers:
  "re:transformer\\\\..*ff\\\\.net\\\\.0\\\\.proj": {method: bnb, bits: 4, double_quant: true}
  "re:transformer\\\\..*attn\\\\.to_v": {method: torchao, type: int8}
  "re:transformer\\\\..*attn\\\\.to_k": {method: bnb, bits: 8}
  transformer.transformer_blocks.1.ff.net.2: {method: higgs, bits: 3, group_size: 32}
  transformer.transformer_blocks.0.ff.net.2: {method: torchao, type: intx, bits: 3, group_size: 32}
"""))
            a.apply_recipe(pipe, recipe, progress=False)
            self._saved = self.tmp / "saved"
            a.save_quantized(pipe, self._saved)
        copy = self.path("saved")
        shutil.copytree(self._saved, copy, dirs_exist_ok=True)
        return copy

    # -- a finished study to tamper with ------------------------------------------------------
    def study(self) -> Path:
        if self._study is None:
            from autoquant.cli.commands import main

            self._study = self.tmp / "study"
            with contextlib.redirect_stdout(io.StringIO()):
                code = main(["search", "--model", TINY, "--dtype", "auto", "--budget", "45%",
                             "--trials", "3", "--seeds", "0", "--no-clip", "--space", "hqq-only",
                             "--sensitivity", "anchored", "--out",
                             str(self._study), "--json"])
            assert code == 0
        copy = self.path("study")
        shutil.copytree(self._study, copy, dirs_exist_ok=True)
        return copy


# -- checking --------------------------------------------------------------------------------
def snapshot(pipe) -> dict:
    import torch

    from autoquant import components_of

    out = {}
    for cname, comp in components_of(pipe).items():
        for name, mod in comp.named_modules():
            out[f"{cname}.{name}:type"] = type(mod)
        for name, t in comp.state_dict().items():
            out[f"{cname}.{name}"] = t.detach().clone() if isinstance(t, torch.Tensor) else t
    return out


def same(a: dict, b: dict) -> bool:
    import torch

    if a.keys() != b.keys() or any(a[k] is not b[k] for k in a if not isinstance(a[k], torch.Tensor)):
        return False
    return all(type(a[k]) is type(b[k]) and type(a[k]) in (torch.Tensor, torch.nn.Parameter)
               and torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def files(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".outputs.lock"}


def api(error: str, fragment: str, call: Callable[[Ctx], Any], touches_pipe=True,
        folder: Callable[[Ctx], Path] | None = None) -> Callable[[Ctx], Outcome]:
    """Call the Python API: it must raise autoquant's ``error`` with ``fragment`` in it."""
    def run(ctx: Ctx) -> Outcome:
        import autoquant

        where = folder(ctx) if folder else None
        before = snapshot(ctx.pipe) if touches_pipe else None
        files_before = files(where) if where else None
        t = time.perf_counter()
        try:
            call(ctx) if where is None else call(ctx, where)
        except autoquant.AutoquantError as e:
            seconds = time.perf_counter() - t
            ok = type(e).__name__ == error or any(c.__name__ == error for c in type(e).__mro__)
            untouched = (before is None or same(before, snapshot(ctx.pipe))) and \
                (where is None or files(where) == files_before)
            return Outcome(ok and fragment in str(e), untouched, f"{type(e).__name__}: {e}",
                           seconds)
        except Exception as e:  # noqa: BLE001 - a traceback the user would see
            ctx.fresh()
            return Outcome(False, False, f"raw {type(e).__name__}: {e}",
                           time.perf_counter() - t)
        ctx.fresh()
        return Outcome(False, True, "no error", time.perf_counter() - t)
    return run


def cli(argv: list[str] | Callable[[Ctx], list[str]], fragment: str, code: int = 2,
        before_model: bool = True, folder: Callable[[Ctx], Path] | None = None
        ) -> Callable[[Ctx], Outcome]:
    """Run the command line: exit ``code``, one-line error with ``fragment``, no traceback.
    ``before_model``: the mistake must be found before any pipeline is loaded."""
    def run(ctx: Ctx) -> Outcome:
        import autoquant.models.pipelines as pipelines
        from autoquant.cli.commands import main

        args = argv(ctx) if callable(argv) else list(argv)
        where = folder(ctx) if folder else None
        files_before = files(where) if where else None
        real = pipelines.load_pipeline
        loaded = []

        def spy(*a, **k):
            loaded.append(a)
            return real(*a, **k)

        pipelines.load_pipeline = spy
        err, out = io.StringIO(), io.StringIO()
        t = time.perf_counter()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
                try:
                    got = main(args)
                except SystemExit as e:  # argparse's own usage errors
                    got = e.code
        except Exception as e:  # noqa: BLE001 - a traceback the user would see
            return Outcome(False, False, f"raw {type(e).__name__}: {e}",
                           time.perf_counter() - t)
        finally:
            pipelines.load_pipeline = real
        seconds = time.perf_counter() - t
        text = err.getvalue()
        clear = (got == code and fragment in text and "Traceback" not in text
                 and (not before_model or not loaded))
        untouched = where is None or files(where) == files_before
        return Outcome(clear, untouched, f"exit {got}: {text.strip()[-400:]}", seconds)
    return run


def recipe_api(text: str | bytes, error: str, fragment: str) -> Callable[[Ctx], Outcome]:
    """Load the recipe text from a file and apply it to the tiny pipeline."""
    def call(ctx: Ctx):
        path = ctx.write("recipe.yaml", text)
        recipe = ctx.autoquant.load_recipe(path)
        ctx.autoquant.apply_recipe(ctx.pipe, recipe, progress=False)
    return api(error, fragment, call)


def space_api(text: str | dict, fragment: str, components=None) -> Callable[[Ctx], Outcome]:
    """Load the space and build the search's groups for the tiny pipeline."""
    def call(ctx: Ctx):
        from autoquant.search._groups import Groups

        body = text if isinstance(text, str) else yaml.safe_dump(text)
        space = ctx.autoquant.load_space(ctx.write("space.yaml", body))
        Groups.build(ctx.autoquant.inventory(ctx.pipe), space, components or ["transformer"])
    return api("SpaceError", fragment, call)


SPACE = {"format": "autoquant-space/1", "candidates": [
    {"method": "hqq", "bits": 4, "group_size": 32}, {"method": "none"}]}


def space_with(**entries) -> dict:
    return {**SPACE, **entries}


# -- saved folders ---------------------------------------------------------------------------
def saved_case(damage: Callable[[Path], None], fragment: str) -> Callable[[Ctx], Outcome]:
    """Damage a copy of a saved folder, then load it into a fresh base pipeline: refused, the
    base untouched, the folder as the damage left it."""
    def call(ctx: Ctx, folder: Path):
        ctx.autoquant.load_quantized(folder, base=ctx.pipe)

    def folder(ctx: Ctx) -> Path:
        ctx.fresh()
        where = ctx.saved()
        damage(where)
        return where

    return api("SavedFolderError", fragment, call, folder=folder)


def _tensors(folder: Path):
    from safetensors import safe_open

    with safe_open(str(folder / "quantized.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def _rewrite(folder: Path, tensors: dict, meta: dict, recompute: bool = False) -> None:
    """Write the tensors file back; ``recompute``: fix the checksums too (a deliberate forger)."""
    from safetensors.torch import save_file

    from autoquant.plans.persist import _sha256

    if recompute:
        meta["checksums"] = json.dumps({k: _sha256(v) for k, v in tensors.items()})
    save_file(tensors, str(folder / "quantized.safetensors"), metadata=meta)


def _edit_header(edit: Callable[[dict], None], recompute: bool = True):
    def damage(folder: Path) -> None:
        tensors, meta = _tensors(folder)
        header = json.loads(meta["autoquant"])
        edit(header)
        meta["autoquant"] = json.dumps(header)
        _rewrite(folder, tensors, meta, recompute)
    return damage


def _edit_tensors(edit: Callable[[dict], None], recompute: bool = False):
    def damage(folder: Path) -> None:
        tensors, meta = _tensors(folder)
        edit(tensors)
        _rewrite(folder, tensors, meta, recompute)
    return damage


def _flip_bytes(tensors: dict) -> None:
    key = next(k for k in tensors if k.endswith("/W_q"))
    t = tensors[key].clone()
    t.view(-1)[:8] ^= 0x5A
    tensors[key] = t


def _truncate(folder: Path) -> None:
    f = folder / "quantized.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _legacy_eval_payload(folder: Path) -> None:
    """The attack from the issue: an old-format folder whose hqq metadata is Python code."""
    import torch

    tensors, meta = _tensors(folder)
    key = next(k for k in tensors if k.endswith("/W_q")).rsplit("/", 1)[0]
    code = f"(__import__('os').system('touch {folder}/PWNED'), torch.bfloat16)[1]"
    tensors[f"{key}/compute_dtype"] = torch.tensor([ord(c) for c in code], dtype=torch.uint8)
    tensors[f"{key}/encoded_state_dict"] = torch.tensor(1, dtype=torch.uint8)
    meta["format"] = "autoquant-quantized/1"
    _rewrite(folder, tensors, meta, recompute=True)


def _payload_in_current_format(folder: Path) -> None:
    import torch

    tensors, meta = _tensors(folder)
    key = next(k for k in tensors if k.endswith("/W_q")).rsplit("/", 1)[0]
    code = f"(__import__('os').system('touch {folder}/PWNED'), torch.bfloat16)[1]"
    tensors[f"{key}/compute_dtype"] = torch.tensor([ord(c) for c in code], dtype=torch.uint8)
    tensors[f"{key}/encoded_state_dict"] = torch.tensor(1, dtype=torch.uint8)
    _rewrite(folder, tensors, meta, recompute=True)


def _no_code_ran(fragment: str, damage):
    """A saved-folder case that must also leave no trace of the payload."""
    inner = saved_case(damage, fragment)

    def run(ctx: Ctx) -> Outcome:
        out = inner(ctx)
        pwned = list(ctx.tmp.rglob("PWNED"))
        return dataclasses.replace(out, clear=out.clear and not pwned,
                                   message=out.message + (" (CODE RAN)" if pwned else ""))
    return run


def _swap_bnb_for_hqq(tensors: dict) -> None:
    bnb = next(k.rsplit("/", 1)[0] for k in tensors if k.endswith("/SCB"))
    hqq = next(k.rsplit("/", 1)[0] for k in tensors if k.endswith("/W_q"))
    for k in [k for k in tensors if k.startswith(bnb + "/")]:
        del tensors[k]
    for k in [k for k in tensors if k.startswith(hqq + "/")]:
        tensors[bnb + "/" + k.rsplit("/", 1)[1]] = tensors[k].clone()


def _bnb_state_json(tensors: dict) -> None:
    import torch

    key = next(k for k in tensors if "quant_state.bitsandbytes" in k)
    state = json.loads(bytes(tensors[key].tolist()))
    state["shape"] = [1, 1]
    tensors[key] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


def _torchao_meta(header: dict) -> None:
    name = next(n for n, e in header.items() if e["config"]["method"] == "torchao")
    meta = json.loads(header[name]["meta"]["torchao"])
    weight = json.loads(meta["layer.weight"])
    weight["_data"]["dtype"] = {"_type": "torch.dtype", "_data": "save"}
    meta["layer.weight"] = json.dumps(weight)
    header[name]["meta"]["torchao"] = json.dumps(meta)


def _rename_layer(header: dict) -> None:
    name = next(n for n in header if "transformer_blocks" in n)
    header[name.replace("transformer_blocks", "transfromer_blocks")] = header.pop(name)


def _header_bits(header: dict) -> None:
    name = next(n for n, e in header.items() if e["config"]["method"] == "hqq")
    header[name]["config"]["bits"] = 2


def _drop_tensor(tensors: dict) -> None:
    del tensors[next(k for k in tensors if k.endswith("/scale"))]


def _edit_recipe(folder: Path) -> None:
    f = folder / "recipe.yaml"
    f.write_text(f.read_text().replace("bits: 4", "bits: 2", 1))


def _bad_header_json(folder: Path) -> None:
    tensors, meta = _tensors(folder)
    meta["autoquant"] = meta["autoquant"][:-7]
    _rewrite(folder, tensors, meta)


# -- caches ----------------------------------------------------------------------------------
def cache_case(damage: Callable[[Path], None], fragment: str) -> Callable[[Ctx], Outcome]:
    """A damaged reference is regenerated with a one-line warning, and scores stay right."""
    def run(ctx: Ctx) -> Outcome:
        from autoquant import EvalSettings, Evaluator
        from autoquant.scoring.references import ReferenceCache

        root = ctx.path("refs")
        settings = EvalSettings(prompts=("a photo of a red cat",), seeds=(0,), steps=2,
                                height=32, width=32)
        Evaluator(ctx.pipe, settings, cache=ReferenceCache(root), progress=False)
        for f in root.rglob("*.safetensors"):
            damage(f)
        logs = io.StringIO()
        handler = logging.StreamHandler(logs)
        logging.getLogger("autoquant").addHandler(handler)
        t = time.perf_counter()
        try:
            cache = ReferenceCache(root)
            ev = Evaluator(ctx.pipe, settings, cache=cache, progress=False)
            result = ev.evaluate(None)
        except Exception as e:  # noqa: BLE001
            return Outcome(False, True, f"raw {type(e).__name__}: {e}", time.perf_counter() - t)
        finally:
            logging.getLogger("autoquant").removeHandler(handler)
        text = logs.getvalue()
        ok = (ev.references_rejected == 1 and ev.references_generated == 1 and fragment in text
              and len(text.strip().splitlines()) == 1
              and result.metrics["psnr"]["mean"] == float("inf"))
        return Outcome(ok, True, text.strip() or "no warning", time.perf_counter() - t)
    return run


def _cache_truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-100])


def _cache_flip(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF
    f.write_bytes(bytes(data))


def _cache_zeros(f: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(f), framework="pt") as r:
        meta, image = r.metadata(), r.get_tensor("image")
    save_file({"image": image * 0}, str(f), metadata=meta)


def _cache_shape(f: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(f), framework="pt") as r:
        meta = r.metadata()
    save_file({"image": torch.rand(3, 8, 8)}, str(f), metadata=meta)


def _cache_garbage(f: Path) -> None:
    f.write_bytes(b"\x00" * 64)


# -- studies ---------------------------------------------------------------------------------
def study_case(sql: str, check: Callable[[str], bool], what: str) -> Callable[[Ctx], Outcome]:
    """Tamper with a finished study's database, then write its HTML report."""
    def run(ctx: Ctx) -> Outcome:
        from autoquant.cli.commands import main

        folder = ctx.study()
        with sqlite3.connect(folder / "study.db") as db:
            db.execute(sql)
        out, err = io.StringIO(), io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["report", "--out", str(folder)])
        seconds = time.perf_counter() - t
        html = (folder / "report.html").read_text() if code == 0 else ""
        return Outcome(code == 0 and check(html), True, f"{what}: exit {code} "
                       f"{err.getvalue().strip()[-200:]}", seconds)
    return run


def _set_attr_sql(key: str, value: str) -> str:
    encoded = json.dumps(value).replace("'", "''")
    return f"UPDATE trial_user_attributes SET value_json = '{encoded}' WHERE key = '{key}'"


def _set_study_attr_sql(key: str, value: Any) -> str:
    encoded = json.dumps(value).replace("'", "''")
    return f"UPDATE study_user_attributes SET value_json = '{encoded}' WHERE key = '{key}'"


def _identity_with(check: Callable[[str], bool], **changes) -> Callable[[Ctx], Outcome]:
    """Change the study's identity attribute, then write the report."""
    def run(ctx: Ctx) -> Outcome:
        from autoquant.cli.commands import main

        folder = ctx.study()
        with sqlite3.connect(folder / "study.db") as db:
            row = db.execute("SELECT value_json FROM study_user_attributes WHERE key = "
                             "'autoquant'").fetchone()
            info = json.loads(row[0])
            info.update(changes)
            db.execute(_set_study_attr_sql("autoquant", info))
        out, err = io.StringIO(), io.StringIO()
        t = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["report", "--out", str(folder)])
        html = (folder / "report.html").read_text() if code == 0 else ""
        return Outcome(code == 0 and check(html), True, f"exit {code}",
                       time.perf_counter() - t)
    return run


def _other_format(folder: Path) -> None:
    tensors, meta = _tensors(folder)
    meta["format"] = "other/1"
    _rewrite(folder, tensors, meta)


# -- the catalogue ---------------------------------------------------------------------------
def cases() -> list[Case]:
    c: list[Case] = []

    def add(kind: str, id: str, run):
        c.append(Case(f"{kind}/{id}", kind, run))

    for section in (_recipe_cases, _space_cases, _argument_cases, _saved_cases, _cache_cases,
                    _study_cases, _api_cases, _machine_cases, _late_cases):
        section(add)
    return c


def _recipe_cases(add) -> None:
    """Recipes."""
    r = RECIPE
    add("recipe", "not-a-mapping", recipe_api("- a\n- b\n", "RecipeError", "a recipe is a mapping"))
    add("recipe", "wrong-format", recipe_api("format: v9\n", "RecipeError", "format must be"))
    add("recipe", "unknown-top-key", recipe_api(r + "layerz: {}\n", "RecipeError",
                                                "unknown top-level key"))
    add("recipe", "unknown-method", recipe_api(r + f"layers: {{{Q0}: {{method: awq}}}}\n",
                                               "RecipeError", "unknown method 'awq'"))
    add("recipe", "bad-bits", recipe_api(r + f"layers: {{{Q0}: {{method: hqq, bits: 5}}}}\n",
                                         "RecipeError", "bits=5 is not supported"))
    add("recipe", "bool-bits", recipe_api(r + f"layers: {{{Q0}: {{method: hqq, bits: true}}}}\n",
                                          "RecipeError", "bits must be an integer"))
    add("recipe", "unknown-option", recipe_api(
        r + f"layers: {{{Q0}: {{method: hqq, bits: 4, speed: 11}}}}\n", "RecipeError",
        "unknown option(s) ['speed']"))
    add("recipe", "group-size-zero", recipe_api(
        r + f"layers: {{{Q0}: {{method: hqq, bits: 4, group_size: 0}}}}\n", "RecipeError",
        "group_size=0 must be >= 8"))
    add("recipe", "group-size-odd", recipe_api(
        r + f"layers: {{{Q0}: {{method: hqq, bits: 4, group_size: 12}}}}\n", "RecipeError",
        "must be a multiple of 8"))
    add("recipe", "bnb-threshold-4bit", recipe_api(
        r + f"layers: {{{Q0}: {{method: bnb, bits: 4, threshold: 6}}}}\n", "RecipeError",
        "threshold (outlier decomposition) applies to 8 bit only"))
    add("recipe", "config-not-mapping", recipe_api(r + f"layers: {{{Q0}: hqq4}}\n",
                                                   "RecipeError", "expected a mapping"))
    add("recipe", "bad-regex", recipe_api(r + 'layers: {"re:(": {method: none}}\n',
                                          "RecipeError", "bad regex"))
    add("recipe", "empty-regex", recipe_api(r + 'layers: {"re:": {method: none}}\n',
                                            "RecipeError", "an empty regex"))
    add("recipe", "regex-matches-nothing", recipe_api(
        r + 'layers: {"re:unet\\\\..*": {method: hqq, bits: 4}}\n', "RecipeError",
        "regex matches no quantizable layer"))
    add("recipe", "unknown-layer", recipe_api(
        r + "layers: {transformer.transformer_blocks.0.attn.to_z: {method: hqq, bits: 4}}\n",
        "RecipeError", "did you mean transformer.transformer_blocks.0.attn.to_"))
    add("recipe", "shape-cannot-take", recipe_api(
        r + "layers: {transformer.x_embedder: {method: hqq, bits: 4, group_size: 64}}\n",
        "RecipeError", "cannot take hqq4-g64: in_features=16 is not divisible"))
    add("recipe", "fingerprint", recipe_api(r + "model: {id: x, fingerprint: 'sha256:00'}\n",
                                            "RecipeError", "model fingerprint sha256:00"))
    add("recipe", "missing-component", recipe_api(
        r + "components: [unet]\ndefault: {method: hqq, bits: 4}\n", "RecipeError",
        "no component 'unet'"))
    add("recipe", "components-not-list", recipe_api(r + "components: transformer\n",
                                                    "RecipeError", "components must be a list"))
    add("recipe", "bad-default", recipe_api(r + "default: {method: hqq, bits: 9}\n",
                                            "RecipeError", "default: hqq: bits=9"))
    add("recipe", "model-not-mapping", recipe_api(r + "model: flux\n", "RecipeError",
                                                  "model must be a mapping"))
    add("recipe", "model-unknown-key", recipe_api(r + "model: {id: x, url: y}\n", "RecipeError",
                                                  "model: unknown key(s) ['url']"))
    add("recipe", "metrics-not-mapping", recipe_api(r + "metrics: [1]\n", "RecipeError",
                                                    "metrics must be a mapping"))
    add("recipe", "non-string-key", recipe_api(r + "layers: {3: {method: none}}\n",
                                               "RecipeError", "must be a non-empty string"))
    add("recipe", "duplicate-layer", recipe_api(
        r + f"layers:\n  {Q0}: {{method: hqq, bits: 4}}\n  {Q0}: {{method: hqq, bits: 8}}\n",
        "RecipeError", "appears twice (lines 3 and 4)"))
    add("recipe", "duplicate-top-key", recipe_api(r + "default: {method: none}\n"
                                                  "default: {method: none}\n", "RecipeError",
                                                  "key 'default' appears twice"))
    add("recipe", "not-utf8", recipe_api(b"format: autoquant-recipe/1\n# \xff\xfe\n",
                                         "RecipeError", "not UTF-8 text"))
    add("recipe", "bad-yaml", recipe_api(r + "layers: {a: [}\n", "RecipeError",
                                         "not valid YAML"))
    add("recipe", "python-tag", recipe_api(r + "layers: !!python/object/apply:os.system "
                                           "['touch /tmp/x']\n", "RecipeError",
                                           "not valid YAML"))
    add("recipe", "alias", recipe_api(r + "default: &a {method: none}\nlayers: {x: *a}\n",
                                      "RecipeError", "anchors (&a) are not allowed"))
    add("recipe", "deep-nesting", recipe_api(r + "layers: " + "[" * 20000 + "]" * 20000 + "\n",
                                             "RecipeError", "nested deeper than 32 levels"))
    add("recipe", "nested-repeat-regex", recipe_api(
        r + 'layers: {"re:(.*.*)*X": {method: hqq, bits: 4}}\n', "RecipeError",
        "regex matches no quantizable layer"))
    add("recipe", "catastrophic-regex", recipe_api(
        r + 'layers: {"re:(?:.*?){30}(?<=q)": {method: hqq, bits: 4}}\n', "RecipeError",
        "took longer than 2 s"))
    add("recipe", "huge-file", recipe_api(r + "layers:\n" + "".join(
        f"  transformer.block_{i}.attn.unknown_layer_{i}: {{method: hqq, bits: 4}}\n"
        for i in range(577_000)), "RecipeError", "larger than the 1 MiB"))
    add("recipe", "too-many-entries", api("RecipeError", "may hold at most 20,000 entries",
                                          lambda ctx: ctx.autoquant.Recipe.from_dict(
                                              {"format": "autoquant-recipe/1", "layers": {
                                                  f"l{i}": {"method": "none"}
                                                  for i in range(20_001)}}),
                                          touches_pipe=False))
    add("recipe", "too-many-regexes", recipe_api(r + "layers:\n" + "".join(
        f'  "re:x{i}": {{method: none}}\n' for i in range(300)), "RecipeError",
        "256 of them regexes"))
    add("recipe", "many-unknown-names", recipe_api(r + "layers:\n" + "".join(
        f"  transformer.nope_{i}: {{method: none}}\n" for i in range(5000)), "RecipeError",
        "... and 4,980 more"))
    add("recipe", "long-pattern", recipe_api(r + f'layers:\n  ? "re:{"a" * 2000}"\n'
                                             f'  : {{method: none}}\n', "RecipeError",
                                             "longer than the 1,000"))
    add("recipe", "fp8-dynamic-on-cpu", recipe_api(
        r + f"layers: {{{Q0}: {{method: torchao, type: fp8_dynamic}}}}\n",
        "BackendUnavailableError", "needs a CUDA GPU"))
    add("recipe", "fp8-int4-on-a-float32-layer", recipe_api(
        r + f"layers: {{{Q0}: {{method: torchao, type: fp8_int4}}}}\n",
        "RecipeError", "computes in bfloat16"))
    add("recipe", "fp8-int4-group-size", recipe_api(
        r + f"layers: {{{Q0}: {{method: torchao, type: fp8_int4, group_size: 64}}}}\n",
        "RecipeError", "fixed at 128 by mslk"))
    add("recipe", "missing-file", api("RecipeError", "no recipe file at",
                                      lambda ctx: ctx.autoquant.load_recipe(ctx.tmp / "nope.yaml"),
                                      touches_pipe=False))
    add("recipe", "is-a-folder", api("RecipeError", "no recipe file at",
                                     lambda ctx: ctx.autoquant.load_recipe(ctx.tmp),
                                     touches_pipe=False))
    add("recipe", "cli-apply-bad-recipe", cli(
        lambda ctx: ["apply", "--model", TINY, "--recipe",
                     str(ctx.write("r.yaml", r + "default: {method: nope}\n"))],
        "unknown method 'nope'"))


def _space_cases(add) -> None:
    """Spaces."""
    add("space", "unknown-name", api("SpaceError", "no search space 'fastest'",
                                     lambda ctx: ctx.autoquant.load_space("fastest"),
                                     touches_pipe=False))
    add("space", "wrong-format", space_api({**SPACE, "format": "space/9"}, "format must be"))
    add("space", "fp-cap-above", space_api(space_with(fp_cap=0.5), "pass --allow-fp-cap"))
    add("space", "fp-cap-text", space_api(space_with(fp_cap="lots"), "fp_cap must be a share"))
    add("space", "fp-cap-bool", space_api(space_with(fp_cap=True), "fp_cap must be a share"))
    add("space", "mbpw-bool", space_api(space_with(max_bits_per_weight=True),
                                        "max_bits_per_weight must be a number"))
    add("space", "duplicate-key", space_api("format: autoquant-space/1\nfp_cap: 0.1\n"
                                            "candidates: [{method: none}]\nfp_cap: 0.2\n",
                                            "key 'fp_cap' appears twice (lines 2 and 4)"))
    add("space", "tie-exact-name", space_api(space_with(tie=["(.*attn)\\.to_q"]),
                                             "is an exact name, which ties nothing"))
    add("space", "tie-no-group", space_api(space_with(tie=["re:.*attn\\.to_q"]),
                                           "has no group"))
    add("space", "tie-not-string", space_api(space_with(tie=[7]), "tie must be a non-empty list"))
    add("space", "protect-bad-regex", space_api(space_with(protect=["re:(("]), "bad regex"))
    add("space", "protect-literal-regex", space_api(
        space_with(protect=["transformer.proj_.*"]), "matches no layer"))
    add("space", "tie-matches-nothing", space_api(space_with(tie=["re:(unet)\\..*"]),
                                                  "matches no layer"))
    add("space", "components-string", space_api(space_with(components="transformer"),
                                                "components must be a non-empty list"))
    add("space", "missing-component", space_api(space_with(components=["unet"]),
                                                "no component 'unet'", components=["unet"]))
    add("space", "objectives-order", space_api(space_with(objectives=["psnr", "bytes"]),
                                               "objectives must start with bytes"))
    add("space", "objectives-unknown", space_api(space_with(objectives=["bytes", "fid"]),
                                                 "objectives: unknown ['fid']"))
    add("space", "no-candidates", space_api(space_with(candidates=[]),
                                            "list at least one config"))
    add("space", "only-none", space_api(space_with(candidates=[{"method": "none"}]),
                                        "not only none"))
    add("space", "bad-candidate", space_api(space_with(candidates=[{"method": "hqq", "bits": 7}]),
                                            "candidates[0]"))
    add("space", "repeated-candidate", space_api(
        space_with(candidates=[{"method": "bnb", "bits": 8}, {"method": "bnb", "bits": 8}]),
        "candidates repeat a config"))
    add("space", "not-utf8", api("SpaceError", "not UTF-8", lambda ctx: ctx.autoquant.load_space(
        ctx.write("s.yaml", b"format: autoquant-space/1\n\xff\n")), touches_pipe=False))
    add("space", "cli-missing-component", cli(
        lambda ctx: ["search", "--model", TINY, "--budget", "40%", "--no-clip", "--out",
                     str(ctx.path("o")), "--space",
                     str(ctx.write("s.yaml", yaml.safe_dump(space_with(components=["unet"]))))],
        "no component 'unet'", before_model=False))
    add("space", "cli-protect-over-cap", cli(
        lambda ctx: ["search", "--model", TINY, "--budget", "40%", "--no-clip", "--out",
                     str(ctx.path("o")), "--space",
                     str(ctx.write("s.yaml", yaml.safe_dump(space_with(
                         protect=["re:transformer\\..*"], fp_cap=0.05))))],
        "above its fp_cap 0.05", before_model=False))


def _argument_cases(add) -> None:
    """Budgets and arguments (the command line)."""
    def search(*extra: str) -> Callable[[Ctx], list[str]]:
        return lambda ctx: ["search", "--model", TINY, "--no-clip", "--out",
                            str(ctx.path("o")), *extra]

    add("argument", "budget-words", cli(search("--budget", "lots"), "budget 'lots': use bytes"))
    add("argument", "budget-zero-share", cli(search("--budget", "0%"), "a share must be in"))
    add("argument", "budget-150-share", cli(search("--budget", "150%"), "a share must be in"))
    add("argument", "budget-zero-bytes", cli(search("--budget", "0GB"), "bytes must be positive"))
    add("argument", "budget-bpw-huge", cli(search("--budget", "40bpw"),
                                          "bits per weight must be in (0, 32]"))
    add("argument", "budget-above-full-precision", cli(search("--budget", "1GB"),
                                                       "is more than the searched components",
                                                       before_model=False))
    add("argument", "budget-below-smallest", cli(search("--budget", "1%"),
                                                 "below the smallest plan", before_model=False))
    add("argument", "trials-zero", cli(search("--budget", "40%", "--trials", "0"),
                                       "0 must be at least 1"))
    add("argument", "trials-negative", cli(search("--budget", "40%", "--trials", "-1"),
                                           "-1 must be at least 1"))
    add("argument", "timeout-zero", cli(search("--budget", "40%", "--timeout", "0"),
                                        "must be a positive number"))
    add("argument", "cache-gib-negative", cli(search("--budget", "40%", "--cache-gib", "-2"),
                                              "must be a positive number"))
    add("argument", "steps-zero", cli(search("--budget", "40%", "--steps", "0"),
                                      "0 must be at least 1"))
    add("argument", "seeds-negative", cli(search("--budget", "40%", "--seeds", "-3"),
                                          "-3 must be a whole number from 0 to"))
    add("argument", "device-cuda-missing", cli(search("--budget", "40%", "--device", "cuda"),
                                               "no CUDA GPU is visible"))
    add("argument", "device-unknown", cli(search("--budget", "40%", "--device", "tpu"),
                                          "not a device"))
    add("argument", "dtype-unknown", cli(search("--budget", "40%", "--dtype", "int3"),
                                         "invalid choice: 'int3'"))
    add("argument", "storage-scheme", cli(search("--budget", "40%", "--storage", "mongodb://x/y"),
                                          "use a database URL"))
    add("argument", "storage-no-folder", cli(search("--budget", "40%", "--storage",
                                                    "sqlite:////nonexistent_dir/x.db"),
                                             "the folder /nonexistent_dir does not exist"))
    add("argument", "storage-no-driver", cli(search("--budget", "40%", "--storage",
                                                    "postgresql+pg8000://u@localhost/db"),
                                             "the driver pg8000 is not installed"))
    add("argument", "out-is-a-file", cli(
        lambda ctx: ["search", "--model", TINY, "--budget", "40%", "--no-clip", "--out",
                     str(ctx.write("file.txt", "x"))], "a file is in the way"))
    add("argument", "out-unwritable", cli(search("--budget", "40%", "--out", "/proc/aq-out"),
                                          "cannot write there"))
    add("argument", "prompts-missing", cli(search("--budget", "40%", "--prompts",
                                                  "/nonexistent.txt"), "no prompts file"))
    add("argument", "prompts-empty", cli(
        lambda ctx: search("--budget", "40%", "--prompts", str(ctx.write("p.txt", "\n\n")))(ctx),
        "holds no prompts"))
    add("argument", "prompts-not-utf8", cli(
        lambda ctx: search("--budget", "40%", "--prompts",
                           str(ctx.write("p.txt", b"\xff\xfe\n")))(ctx), "is not UTF-8"))
    add("argument", "space-missing-file", cli(search("--budget", "40%", "--space", "./nope.yaml"),
                                              "no search space './nope.yaml'"))
    add("argument", "clip-bogus", cli(["evaluate", "--model", TINY, "--clip", "bogus"],
                                      "CLIP spec 'bogus'", before_model=False))
    add("argument", "clip-missing-for-model", cli(["evaluate", "--model", TINY],
                                                  "no default CLIP for tiny-flux",
                                                  before_model=False))
    add("argument", "model-missing-folder", cli(["inspect", "--model", "./no/such/folder"],
                                                "is not a folder with a diffusers pipeline",
                                                before_model=False))
    add("argument", "model-unreachable-hub", cli(["inspect", "--model", "nobody/none"],
                                                 "could not load 'nobody/none'",
                                                 before_model=False))
    # hqq 3-bit: no near-exact GGUF type (4-bit hqq maps to Q4_1), and no --requantize
    hqq_recipe = "format: autoquant-recipe/1\ndefault: {method: hqq, bits: 3}\n"
    gguf_recipe = "format: autoquant-recipe/1\ndefault: {method: gguf, type: Q4_0}\n"
    add("export", "recipe-missing", cli(lambda ctx: ["export", "--model", TINY, "--recipe",
                                                     str(ctx.tmp / "nope.yaml"), "--out",
                                                     str(ctx.path("m.gguf"))], "no recipe file"))
    add("export", "format-unknown", cli(lambda ctx: ["export", "--model", TINY, "--recipe",
                                                     str(ctx.write("r.yaml", gguf_recipe)),
                                                     "--format", "onnx", "--out",
                                                     str(ctx.path("m.gguf"))], "invalid choice"))
    add("export", "recipe-names-no-model", cli(lambda ctx: [
        "export", "--recipe", str(ctx.write("r.yaml", gguf_recipe)), "--out",
        str(ctx.path("m.gguf"))], "the recipe names no model"))
    add("export", "non-gguf-layers", cli(lambda ctx: [
        "export", "--model", TINY, "--recipe", str(ctx.write("r.yaml", hqq_recipe)), "--out",
        str(ctx.path("m.gguf")), "--names", "diffusers"], "--requantize", before_model=False))
    add("export", "search-space-not-gguf", cli(search("--budget", "40%", "--export", "gguf"),
                                               "--space gguf"))
    add("export", "evaluate-gguf-missing", cli(lambda ctx: [
        "evaluate", "--model", TINY, "--no-clip", "--gguf", str(ctx.tmp / "none.gguf")],
        "no such file"))
    add("export", "evaluate-gguf-junk", cli(lambda ctx: [
        "evaluate", "--model", TINY, "--no-clip", "--gguf",
        str(ctx.write("j.gguf", b"GGUF" + bytes(range(256)) * 8))], "not a readable GGUF file",
        before_model=False))
    add("export", "evaluate-gguf-and-recipe", cli(lambda ctx: [
        "evaluate", "--model", TINY, "--no-clip", "--gguf", "x.gguf", "--recipe",
        str(ctx.write("r.yaml", gguf_recipe))], "give only one of"))
    add("export", "comfy-gguf-layers", cli(lambda ctx: [
        "export", "--model", TINY, "--recipe", str(ctx.write("r.yaml", gguf_recipe)),
        "--format", "comfy", "--out", str(ctx.path("m.safetensors"))],
        "no ComfyUI format of this target", before_model=False))
    add("export", "comfy-hqq-without-awq-target", cli(lambda ctx: [
        "export", "--model", TINY, "--recipe", str(ctx.write(
            "r.yaml", "format: autoquant-recipe/1\ndefault: {method: hqq, bits: 4, "
                      "group_size: 64}\n")),
        "--format", "comfy", "--out", str(ctx.path("m.safetensors"))], "--comfy-target awq",
        before_model=False))
    add("export", "evaluate-comfy-junk-file", cli(lambda ctx: [
        "evaluate", "--model", TINY, "--no-clip", "--comfy",
        str(ctx.write("j.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\":1}  "))],
        "not a readable safetensors file", before_model=False))
    add("export", "evaluate-comfy-missing-file", cli(lambda ctx: [
        "evaluate", "--model", TINY, "--no-clip", "--comfy", str(ctx.path("nope.safetensors"))],
        "no such file", before_model=False))
    add("export", "diffusers-over-a-foreign-folder", cli(lambda ctx: [
        "export", "--model", TINY, "--recipe", str(ctx.write("r.yaml", gguf_recipe)),
        "--format", "diffusers", "--out", str(ctx.write("mine/notes.txt", "keep").parent)],
        "holds other files"))
    add("export", "diffusers-hqq-layers", cli(lambda ctx: [
        "export", "--model", TINY, "--recipe", str(ctx.write("r.yaml", hqq_recipe)),
        "--format", "diffusers", "--no-score", "--out", str(ctx.path("out"))],
        "formats that hold this component", before_model=False))
    add("export", "evaluate-diffusers-not-an-export", cli(lambda ctx: [
        "evaluate", "--model", TINY, "--no-clip", "--diffusers",
        str(ctx.write("d/model_index.json", "{}").parent)], "not a folder autoquant export",
        before_model=False))
    add("argument", "batch-size-zero", cli(["evaluate", "--model", TINY, "--no-clip",
                                            "--batch-size", "0"], "0 must be at least 1"))
    add("argument", "baseline-option-no-equals", cli(
        lambda ctx: ["baseline", "--model", TINY, "--method", "hqq", "--options", "group_size",
                     "--out", str(ctx.path("b.yaml"))], "takes key=value pairs"))
    add("argument", "baseline-bad-option", cli(
        lambda ctx: ["baseline", "--model", TINY, "--method", "hqq", "--options", "speed=3",
                     "--out", str(ctx.path("b.yaml"))], "unknown option(s) ['speed']"))
    add("argument", "baseline-unknown-method", cli(
        lambda ctx: ["baseline", "--model", TINY, "--method", "awq", "--out",
                     str(ctx.path("b.yaml"))], "unknown method 'awq'"))
    add("argument", "resume-nothing", cli(search("--budget", "40%", "--resume"),
                                          "there is no study", before_model=False))
    add("argument", "join-other-settings", cli(
        lambda ctx: ["search", "--model", TINY, "--dtype", "auto", "--budget", "35%",
                     "--trials", "3", "--seeds", "0", "--no-clip", "--space", "hqq-only",
                     "--sensitivity", "anchored", "--out", str(ctx.study()),
                     "--study", "autoquant-tiny-flux-45%"],
        "budget: this worker 35%", before_model=False))
    add("argument", "report-no-study", cli(lambda ctx: ["report", "--out", str(ctx.path("e"))],
                                           "holds no study.db"))
    add("argument", "report-nothing-given", cli(["report"], "give the search's --out folder"))


def _saved_cases(add) -> None:
    """Saved folders."""
    add("saved", "empty-folder", saved_case(lambda f: [p.unlink() for p in f.iterdir()],
                                            "is not a saved autoquant pipeline"))
    add("saved", "no-recipe", saved_case(lambda f: (f / "recipe.yaml").unlink(),
                                         "is not a saved autoquant pipeline"))
    add("saved", "truncated-tensors", saved_case(_truncate, "not a readable safetensors file"))
    add("saved", "random-bytes-in-W_q", saved_case(_edit_tensors(_flip_bytes),
                                                   "does not match its checksum"))
    add("saved", "recipe-edited", saved_case(_edit_recipe, "recipe.yaml was changed after saving"))
    add("saved", "header-bits-edited", saved_case(_edit_header(_header_bits),
                                                  "the two were not saved together"))
    add("saved", "renamed-layer", saved_case(_edit_header(_rename_layer), "holds nothing"))
    add("saved", "missing-tensor", saved_case(_edit_tensors(_drop_tensor, recompute=True),
                                              "missing tensor 'scale'"))
    add("saved", "malformed-header-json", saved_case(_bad_header_json, "the header is malformed"))
    add("saved", "bnb-swapped-for-hqq", saved_case(_edit_tensors(_swap_bnb_for_hqq, True),
                                                   "missing tensor 'SCB'"))
    add("saved", "bnb-quant-state-forged", saved_case(_edit_tensors(_bnb_state_json, True),
                                                      "the config and layer say"))
    add("saved", "torchao-metadata-forged", saved_case(_edit_header(_torchao_meta),
                                                       "torchao metadata differs"))
    add("saved", "hqq-eval-payload-old-format", _no_code_ran("autoquant-quantized/1",
                                                             _legacy_eval_payload))
    add("saved", "hqq-eval-payload", _no_code_ran("unexpected tensor 'compute_dtype'",
                                                  _payload_in_current_format))
    add("saved", "unknown-format", saved_case(_other_format, "expected 'autoquant-quantized/2'"))
    add("saved", "wrong-base-model", api("SavedFolderError", "wrong base model",
                                         lambda ctx: ctx.autoquant.load_quantized(
                                             ctx.saved(), base=ctx.autoquant.load_pipeline(
                                                 "tiny-sd", dtype="auto")),
                                         touches_pipe=False))
    add("saved", "stray-tensor", saved_case(_edit_tensors(
        lambda t: t.__setitem__("nowhere/x", t[next(iter(t))].clone()), True),
        "belongs to no layer"))


def _cache_cases(add) -> None:
    """Caches."""
    add("cache", "reference-truncated", cache_case(_cache_truncate, "unreadable"))
    add("cache", "reference-flipped-bytes", cache_case(_cache_flip, "damaged"))
    add("cache", "reference-zeros", cache_case(_cache_zeros, "checksum does not match"))
    add("cache", "reference-wrong-shape", cache_case(_cache_shape, "wrong shape"))
    add("cache", "reference-garbage", cache_case(_cache_garbage, "unreadable"))


def _study_cases(add) -> None:
    """Studies."""
    add("study", "artifact-absolute-path", study_case(
        _set_attr_sql("images_artifact", "/etc/passwd"),
        lambda h: "root:x:0:0" not in h and "cm9vdDp4OjA6" not in h  # nor in base64
        and h.count("data:image/png") >= 1, "not embedded"))
    add("study", "artifact-traversal", study_case(
        _set_attr_sql("images_artifact", "../../../../etc/hostname"),
        lambda h: h.count("data:image/png") >= 1, "not embedded"))
    add("study", "script-in-source", study_case(
        _set_attr_sql("source", "<script>alert(1)</script>"),
        lambda h: "<script>alert(1)" not in h and "&lt;script&gt;alert(1)" in h, "escaped"))
    add("study", "script-in-model", _identity_with(
        lambda h: "<img src=x onerror" not in h and "&lt;img src=x onerror" in h,
        model="<img src=x onerror=alert(1)>"))
    add("study", "script-in-prompts", _identity_with(
        lambda h: "<b>bold</b>" not in h and "&lt;b&gt;bold" in h, prompts=["<b>bold</b>"]))
    add("study", "not-autoquant", api("InputError", "was not made by autoquant search",
                                      lambda ctx: _plain_study(ctx), touches_pipe=False))


def _plain_study(ctx: Ctx):
    import optuna

    from autoquant import explore

    folder = ctx.path("plain")
    optuna.create_study(storage=f"sqlite:///{folder.parent / 'study.db'}", study_name="x")
    explore.open_study(folder.parent)


# -- the Python API's arguments ----------------------------------------------------------------
def _api_cases(add) -> None:
    """Public functions given the wrong kind of argument: a message that says what to pass."""
    a = lambda ctx: ctx.autoquant  # noqa: E731
    add("api", "apply-recipe-int", api("ArgumentTypeError", "expected an autoquant.Recipe",
                                       lambda ctx: a(ctx).apply_recipe(ctx.pipe, 42)))
    add("api", "apply-recipe-missing-path", api(
        "RecipeError", "no recipe file at",
        lambda ctx: a(ctx).apply_recipe(ctx.pipe, str(ctx.tmp / "nope.yaml"))))
    add("api", "apply-recipe-bad-dict", api(
        "RecipeError", "format must be",
        lambda ctx: a(ctx).apply_recipe(ctx.pipe, {"format": "v0"})))
    add("api", "apply-to-a-string", api("ArgumentTypeError", "expected a diffusers pipeline",
                                        lambda ctx: a(ctx).apply_recipe(
                                            "tiny-flux", a(ctx).Recipe.from_dict(
                                                yaml.safe_load(RECIPE))), touches_pipe=False))
    add("api", "save-to-an-int", api("ArgumentTypeError", "expected a folder path",
                                     lambda ctx: a(ctx).save_quantized(ctx.pipe, 3)))
    add("api", "load-from-none", api("ArgumentTypeError", "the folder save_quantized wrote",
                                     lambda ctx: a(ctx).load_quantized(None), touches_pipe=False))
    add("api", "load-recipe-int", api("ArgumentTypeError", "a recipe file's path",
                                      lambda ctx: a(ctx).load_recipe(7), touches_pipe=False))
    add("api", "load-space-none", api("ArgumentTypeError", "a space's name",
                                      lambda ctx: a(ctx).load_space(None), touches_pipe=False))
    add("api", "evaluator-settings-string", api(
        "ArgumentTypeError", "an autoquant.EvalSettings",
        lambda ctx: a(ctx).Evaluator(ctx.pipe, "demo")))
    add("api", "inventory-of-a-dict", api("ArgumentTypeError", "expected a diffusers pipeline",
                                          lambda ctx: a(ctx).inventory({"a": 1}),
                                          touches_pipe=False))
    add("api", "settings-seed-above-2**32", api(
        "InputError", "from 0 to 4294967295",
        lambda ctx: a(ctx).EvalSettings(prompts=("x",), seeds=(2**32,)), touches_pipe=False))
    add("api", "save-into-a-folder-of-other-files", api(
        "InputError", "holds other files", _save_into_busy_folder, touches_pipe=False,
        folder=lambda ctx: _busy_folder(ctx)))
    add("api", "save-onto-a-file", api("InputError", "is a file", _save_onto_file,
                                       touches_pipe=False, folder=lambda ctx: _busy_folder(ctx)))


def _quantized(ctx: Ctx):
    pipe = ctx.fresh()
    ctx.autoquant.apply_recipe(pipe, ctx.autoquant.Recipe.from_dict(yaml.safe_load(
        RECIPE + "components: [transformer]\ndefault: {method: hqq, bits: 4, group_size: 32}\n")),
        progress=False)
    return pipe


def _busy_folder(ctx: Ctx) -> Path:
    folder = ctx.path("mine")
    folder.mkdir()
    (folder / "notes.txt").write_text("my notes")
    return folder


def _save_into_busy_folder(ctx: Ctx, folder: Path):
    ctx.autoquant.save_quantized(_quantized(ctx), folder)


def _save_onto_file(ctx: Ctx, folder: Path):
    ctx.autoquant.save_quantized(_quantized(ctx), folder / "notes.txt")


# -- the machine: disks, environment, studies written elsewhere ------------------------------------
@contextlib.contextmanager
def _full_disk(ctx: Ctx):
    from .helpers import full_disk

    disk = ctx.path("disk")
    disk.mkdir()
    with full_disk(disk, "8m") as fill:
        yield disk, fill


def _disk_full_cli(argv: Callable[[Path], list[str]], prepare: Callable[[Ctx, Path], None]
                   ) -> Callable[[Ctx], Outcome]:
    """A command that writes to a full disk: exit 1, one line that says so, the old file kept."""
    def run(ctx: Ctx) -> Outcome:
        with _full_disk(ctx) as (disk, fill):
            prepare(ctx, disk)
            fill()
            inner = cli(lambda _: argv(disk), "the disk is full", code=1, before_model=False,
                        folder=lambda _: disk)
            out = inner(ctx)
            lines = [x for x in out.message.replace("\r", "\n").splitlines() if "error" in x]
            return dataclasses.replace(out, clear=out.clear and len(lines) == 1)
    return run


def _old_recipe(ctx: Ctx, disk: Path) -> None:
    (disk / "r.yaml").write_text(RECIPE + "default: {method: hqq, bits: 8}\n")


def _old_saved(ctx: Ctx, disk: Path) -> None:
    ctx.autoquant.save_quantized(_quantized(ctx), disk / "saved")


def _with_env(env: dict, run: Callable[[Ctx], Outcome]) -> Callable[[Ctx], Outcome]:
    def wrapped(ctx: Ctx) -> Outcome:
        import os

        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: v(ctx) if callable(v) else v for k, v in env.items()})
        try:
            return run(ctx)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return wrapped


def _corrupt_db(how: str):
    def folder(ctx: Ctx) -> Path:
        study = ctx.study()
        db = study / "study.db"
        data = db.read_bytes()
        db.write_bytes({"random": bytes(range(256)) * 64, "truncated": data[:len(data) // 3],
                        "zeros": b"\0" * len(data)}[how])
        return study
    return folder


def _machine_cases(add) -> None:
    """What the machine does to a user: full disks, a cache path that is a file, damaged study
    databases, workers that cannot reach the study's artifacts."""
    add("machine", "disk-full-baseline", _disk_full_cli(
        lambda d: ["baseline", "--model", TINY, "--method", "hqq", "--bits", "4", "--out",
                   str(d / "r.yaml")], _old_recipe))
    add("machine", "disk-full-apply-save", _disk_full_cli(
        lambda d: ["apply", "--model", TINY, "--recipe", str(d / "r.yaml"), "--save",
                   str(d / "saved")], lambda ctx, d: (_old_saved(ctx, d), _old_recipe(ctx, d))))
    add("machine", "cache-is-a-file", _with_env(
        {"AUTOQUANT_CACHE": lambda ctx: str(ctx.write("cachefile", "x"))},
        cli(["evaluate", "--model", TINY, "--no-clip"], "is a file, not a folder")))
    add("machine", "cache-is-a-file-api", _with_env(
        {"AUTOQUANT_CACHE": lambda ctx: str(ctx.write("cachefile", "x"))},
        api("InputError", "is a file, not a folder",
            lambda ctx: ctx.autoquant.Evaluator(ctx.pipe, ctx.autoquant.EvalSettings(
                prompts=("x",), seeds=(0,), steps=1, height=32, width=32)))))
    for how in ("random", "truncated", "zeros"):
        add("machine", f"study-db-{how}", cli(lambda ctx, how=how: [
            "report", "--out", str(_corrupt_db(how)(ctx))],
            "not a readable Optuna study database", before_model=False))
    add("machine", "artifacts-other-folder", cli(
        lambda ctx: ["search", "--model", TINY, "--dtype", "auto", "--budget", "45%",
                     "--trials", "5", "--seeds", "0", "--no-clip", "--space", "hqq-only",
                     "--sensitivity", "anchored", "--out", str(ctx.study()), "--artifacts",
                     str(ctx.path("elsewhere"))],
        "the study keeps them at", before_model=False))
    add("machine", "artifacts-ftp", cli(
        lambda ctx: ["search", "--model", TINY, "--budget", "40%", "--no-clip", "--out",
                     str(ctx.path("o")), "--artifacts", "ftp://host/x"],
        "use a folder, s3://bucket[/prefix]"))
    add("machine", "artifacts-bad-bucket", cli(
        lambda ctx: ["search", "--model", TINY, "--budget", "40%", "--no-clip", "--out",
                     str(ctx.path("o")), "--artifacts", "s3://No_Such/x"],
        "is not a bucket name"))
    add("machine", "artifacts-prefix-traversal", cli(
        lambda ctx: ["search", "--model", TINY, "--budget", "40%", "--no-clip", "--out",
                     str(ctx.path("o")), "--artifacts", "s3://bucket/a/../../b"],
        "may not hold '.' or '..'"))


def _late_cases(add) -> None:
    """Arguments found only after the work (or a model load), and tampered study attributes."""
    def run_cmd(name: str, *extra: str) -> Callable[[Ctx], list[str]]:
        return lambda ctx: [name, "--model", TINY, *extra]

    big = str(2**32)
    add("argument", "search-seed-above-2**32", cli(
        lambda ctx: ["search", "--model", TINY, "--budget", "40%", "--no-clip", "--out",
                     str(ctx.path("o")), "--seed", big], "from 0 to 4294967295"))
    add("argument", "seeds-above-2**32", cli(run_cmd("evaluate", "--no-clip", "--seeds", big),
                                             "from 0 to 4294967295"))
    add("argument", "apply-seed-above-2**32", cli(
        lambda ctx: ["apply", "--model", TINY, "--recipe", str(ctx.write("r.yaml", RECIPE)),
                     "--prompt", "x", "--seed", big], "from 0 to 4294967295"))
    add("argument", "size-not-multiple-of-8", cli(run_cmd("evaluate", "--no-clip", "--size", "30"),
                                                  "a multiple of 8"))
    add("argument", "size-huge", cli(run_cmd("evaluate", "--no-clip", "--size", "100000"),
                                     "from 8 to 8192"))
    add("argument", "size-tiny", cli(run_cmd("evaluate", "--no-clip", "--size", "4"),
                                     "from 8 to 8192"))
    add("argument", "image-unknown-extension", cli(
        lambda ctx: ["apply", "--model", TINY, "--recipe", str(ctx.write("r.yaml", RECIPE)),
                     "--prompt", "x", "--out", str(ctx.path("image.xyz"))],
        "Pillow cannot write .xyz"))
    add("argument", "image-no-extension", cli(
        lambda ctx: ["apply", "--model", TINY, "--recipe", str(ctx.write("r.yaml", RECIPE)),
                     "--prompt", "x", "--out", str(ctx.path("image"))],
        "without an extension"))
    add("argument", "attention-unknown", cli(
        lambda ctx: ["apply", "--model", TINY, "--recipe", str(ctx.write("r.yaml", RECIPE)),
                     "--attention", "fast"], "choose one of native, cudnn"))
    add("argument", "attention-cudnn-on-cpu", cli(
        lambda ctx: ["apply", "--model", TINY, "--recipe", str(ctx.write("r.yaml", RECIPE)),
                     "--attention", "cudnn"], "runs on CUDA: pass --device cuda"))
    add("argument", "save-onto-a-file", cli(
        lambda ctx: ["apply", "--model", TINY, "--recipe", str(ctx.write("r.yaml", RECIPE)),
                     "--save", str(ctx.write("taken", "mine"))], "a file is in the way"))
    add("study", "identity-budget-bytes-text", _identity_refused(budget_bytes="lots"))
    add("study", "identity-fp-bytes-zero", _identity_refused(fp_bytes=0))
    add("study", "identity-objectives-not-a-list", _identity_refused(objectives="bytes,psnr"))
    add("study", "identity-groups-numbers", _identity_refused(groups={"g": [1, 2]}))
    add("study", "identity-not-a-mapping", _identity_refused(_whole=[1, 2, 3]))
    add("study", "predicted-bytes-text", study_case(
        _set_attr_sql("predicted_bytes", "many"), lambda h: "<table>" in h, "report written"))
    add("study", "worker-not-text", study_case(
        "UPDATE trial_user_attributes SET value_json = '[1, {\"a\": 2}]' WHERE key = 'worker'",
        lambda h: "<table>" in h, "report written"))
    add("study", "artifacts-location-elsewhere", study_case(
        _set_study_attr_sql("artifacts", {"location": "/etc", "host": "x"}),
        lambda h: "root:x:0:0" not in h and h.count("data:image/png") >= 1, "not followed"))


def _identity_refused(**changes) -> Callable[[Ctx], Outcome]:
    """A study attribute changed by hand: report refuses it in one line (exit 2)."""
    def folder_args(ctx: Ctx) -> list[str]:
        folder = ctx.study()
        with sqlite3.connect(folder / "study.db") as db:
            row = db.execute("SELECT value_json FROM study_user_attributes WHERE key = "
                             "'autoquant'").fetchone()
            info = changes["_whole"] if "_whole" in changes else {**json.loads(row[0]),
                                                                   **changes}
            db.execute(_set_study_attr_sql("autoquant", info))
        return ["report", "--out", str(folder)]
    fragment = "was not made by autoquant search" if "_whole" in changes else \
        f"wrong or missing: {next(iter(changes))}"
    return cli(folder_args, fragment, before_model=False)
