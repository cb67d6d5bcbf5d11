"""The docs match the code: a page per dataset preset, the README's method table equals the
registered methods, and every example command (README.md, docs/**/*.md, each verb's help) parses
with the real parser, names config files and keys that exist, and reads only paths that an
example command writes (or the user's own data)."""

from __future__ import annotations

import argparse
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from asa3d.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
PARSER = build_parser()


# --------------------------------------------------------------------------------------------
# dataset presets and methods
# --------------------------------------------------------------------------------------------
def _preset_table() -> dict[str, Path]:
    """preset name -> the page its row in docs/datasets/README.md links."""
    rows = {}
    for line in (REPO / "docs" / "datasets" / "README.md").read_text().splitlines():
        m = re.match(r"^\|\s*(`[^|]+)\|\s*\[[^\]]+\]\(([^)]+)\)", line)
        if m:
            for name in re.findall(r"`([\w]+)`", m.group(1)):
                rows[name] = REPO / "docs" / "datasets" / m.group(2)
    return rows


def test_every_preset_has_a_page() -> None:
    from asa3d.data.presets import PRESETS
    from asa3d.data.presets_2d import PRESETS_2D

    rows = _preset_table()
    names = {*PRESETS, *PRESETS_2D, "msd"}
    assert names <= set(rows), f"presets without a row in docs/datasets/README.md: {names - set(rows)}"
    assert set(rows) <= names, f"rows of presets that do not exist: {set(rows) - names}"
    for name in names:
        page = REPO / "docs" / "datasets" / f"{name}.md"
        page = page if page.is_file() else rows[name]  # amos22_paper and amos22_ct share amos22.md
        assert page.is_file(), f"preset {name}: no page {page}"
        text = page.read_text()
        assert f"data.preset={name}" in text or f"`{name}`" in text, f"{page} does not name the preset {name}"
        for heading in ("Layout expected", "Split", "Label names", "What the paper"):
            assert heading in text, f"{page}: no '{heading}' section"


def _readme_methods() -> dict[str, str]:
    """method.name -> status cell, from the README's method table."""
    out = {}
    for line in (REPO / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and (m := re.search(r"method\.name=(\w+)", cells[1])):
            out[m.group(1)] = cells[1]
        elif len(cells) == 3 and "planned" in cells[1].lower():
            out[f"planned:{cells[0]}"] = cells[1]
    return out


def test_readme_method_table_is_the_registered_methods() -> None:
    from asa3d.methods import load_builtin_methods
    from asa3d.methods.base import METHODS

    load_builtin_methods()
    shipped = {n for n, cls in METHODS.items() if cls.__module__.startswith("asa3d.")}  # not tests' toys
    table = _readme_methods()
    implemented = {k for k, v in table.items() if not k.startswith("planned:")}
    assert implemented == shipped, (implemented, sorted(shipped))
    assert all(v.startswith("implemented") for k, v in table.items() if k in implemented)


# --------------------------------------------------------------------------------------------
# example commands
# --------------------------------------------------------------------------------------------
@dataclass
class Example:
    where: str
    text: str
    argv: list[str] = field(default_factory=list)


def _verbs(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _shell_vars(text: str) -> dict[str, str]:
    """``NAME=value`` lines of a document's shell blocks (e.g. the walk-through's ROOT and TINY)."""
    found = {}
    for m in re.finditer(r"^(?:export )?([A-Z][A-Z0-9_]*)=(\"[^\"]*\"|\S+)", text, re.M):
        found[m.group(1)] = m.group(2).strip('"')
    return found


def _commands(text: str, where: str, inline: bool) -> list[Example]:
    """Every ``asa3d ...`` command in fenced blocks (lines joined at ``\\``; ``&&`` splits) and,
    with ``inline``, in code spans."""
    found: list[Example] = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) if inline else [text]
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                found += _command(part, where)
    if inline:
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for span in re.findall(r"`([^`]+)`", prose):
            if span.startswith("asa3d "):
                found += _command(" ".join(span.split()), where)  # a span may wrap over two lines
    return found


def _command(part: str, where: str) -> list[Example]:
    m = re.search(r"(?:^|\s)(?:asa3d|-m asa3d\.cli)\s+(.*)$", part.strip())
    if not m or part.strip().startswith("#"):
        return []
    rest = m.group(1).split(" #", 1)[0].strip()
    return [Example(where, rest)]


def _examples() -> list[Example]:
    out = []
    for doc in DOCS:
        text = doc.read_text()
        env = _shell_vars(text)
        for ex in _commands(text, str(doc.relative_to(REPO)), inline=True):
            expanded = re.sub(
                r"\$\{?([A-Z][A-Z0-9_]*)\}?",
                lambda v, env=env: env.get(v.group(1), f"/data/{v.group(1)}"),
                ex.text,
            )
            ex.argv = shlex.split(expanded)
            out.append(ex)
    for name, sub in _all_parsers(PARSER).items():
        epilog = "\n".join(filter(None, [sub.epilog, _config_help_head(sub)]))
        for ex in _commands(epilog, f"asa3d {name} --help", inline=False):
            ex.argv = shlex.split(ex.text)
            out.append(ex)
    return out


def _config_help_head(p: argparse.ArgumentParser) -> str:
    """The examples a ConfigHelpAction prints above the keys (kept out of ``epilog`` until --help)."""
    from asa3d.cli_help import ConfigHelpAction

    return "\n".join(a.head for a in p._actions if isinstance(a, ConfigHelpAction))


def _all_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    out = {}
    for name, sub in _verbs(parser).items():
        out[prefix + name] = sub
        out.update(_all_parsers(sub, prefix + name + " "))
    return out


EXAMPLES = _examples()


def _is_synopsis(argv: list[str]) -> bool:
    """A usage line, not an example: ``[--out RUN_DIR]``, ``<folder>``, ``VERB``, ``...`` alone."""
    return any(t.startswith(("[", "<")) or t in ("VERB", "|") for t in argv)


def _verb_chain(argv: list[str]) -> tuple[list[str], list[str]]:
    chain, parser = [], PARSER
    while argv and (subs := _verbs(parser)) and argv[0] in subs:
        chain.append(argv[0])
        parser = subs[argv[0]]
        argv = argv[1:]
    return chain, argv


def test_examples_were_found() -> None:
    wheres = {e.where for e in EXAMPLES}
    assert len(EXAMPLES) > 60 and "README.md" in wheres and "docs/your_data.md" in wheres
    assert any(w.startswith("asa3d finetune --help") for w in wheres)


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: f"{e.where}: {e.text[:60]}")
def test_example_parses_with_the_real_parser(ex: Example) -> None:
    argv = [t for t in ex.argv if t != "..."]
    if _is_synopsis(argv) or {"-h", "--help"} & set(argv):
        return
    chain, rest = _verb_chain(argv)
    assert chain, f"{ex.where}: `asa3d {ex.text}` names no verb ({sorted(_verbs(PARSER))})"
    if not rest:  # `asa3d pretrain`: a reference to the verb, which exists
        return
    try:
        ns = PARSER.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{ex.where}: `asa3d {ex.text}` does not parse (exit {exc.code})")
    _check_config(ex, chain, ns)


def _placeholder(token: str) -> bool:
    """A name the reader replaces: ``CFG``, ``RUN.yaml``, ``RUN/last.pt``, ``BTCV_DIR``."""
    head = Path(token).parts[0] if token else ""
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*(\.\w+)?", head))


def _check_config(ex: Example, chain: list[str], ns: argparse.Namespace) -> None:
    from asa3d.config import load_config, resolve_config_path
    from asa3d.config_sections import PretrainConfig
    from asa3d.eval.config_sections import EvaluateConfig, FinetuneConfig

    config = getattr(ns, "config", None)
    if config and not _placeholder(config):
        resolve_config_path(config)  # ConfigError when the file does not exist
    classes = {"pretrain": PretrainConfig, "plan": PretrainConfig, "finetune": FinetuneConfig}
    classes |= {"probe": FinetuneConfig, "evaluate": EvaluateConfig}
    cls = classes.get(chain[0])
    overrides = [o for o in getattr(ns, "overrides", None) or [] if "=" in o]
    if cls and (config is None or not _placeholder(config)):
        if cls is EvaluateConfig and config is None:
            return
        load_config(cls, config or ns.config, overrides)  # unknown keys: ConfigError with a suggestion


def test_every_configs_path_named_in_the_docs_exists() -> None:
    missing = []
    for doc in DOCS:
        for m in re.finditer(r"configs/[\w/.-]+\.yaml", doc.read_text()):
            if not (REPO / m.group(0)).is_file():
                missing.append(f"{doc.relative_to(REPO)}: {m.group(0)}")
    assert not missing, missing


# --------------------------------------------------------------------------------------------
# an example reads only what another example writes
# --------------------------------------------------------------------------------------------
def _parsed() -> list[tuple[Example, list[str], argparse.Namespace]]:
    out = []
    for ex in EXAMPLES:
        argv = [t for t in ex.argv if t != "..."]
        if _is_synopsis(argv) or {"-h", "--help"} & set(argv):
            continue
        chain, rest = _verb_chain(argv)
        if chain and rest:
            try:
                out.append((ex, chain, PARSER.parse_args(argv)))
            except SystemExit:
                continue  # reported by test_example_parses_with_the_real_parser
    return out


def _written(chain: list[str], ns: argparse.Namespace) -> set[str]:
    """What a command writes, as the code names it (pretraining: ``<out>/last.pt``)."""
    from asa3d.engine.checkpoint import LAST

    verb, out = chain[0], getattr(ns, "out", None)
    if not out:
        return set()
    out = out.rstrip("/")
    if verb == "pretrain":
        return {out, f"{out}/{LAST}"}
    if verb in ("finetune", "probe"):
        return {out, f"{out}/model_final.pt", f"{out}/model.json"}
    if verb == "data" and chain[1:] == ["phantom"]:
        return {out, f"{out}/dataset.json"}
    return {out}


def _read(chain: list[str], ns: argparse.Namespace) -> list[tuple[str, str]]:
    """(flag, path) of the files a command reads that asa3d itself made."""
    verb = chain[0]
    reads = []
    if verb == "export":
        reads.append(("CHECKPOINT", ns.checkpoint))
    if verb in ("finetune", "probe") and ns.init and ns.init != "scratch":
        reads.append(("--init", ns.init))
    if verb in ("finetune", "probe", "pretrain") and isinstance(ns.resume, str):
        reads.append(("--resume", ns.resume))
    if verb == "predict":
        reads.append(("--model", ns.model))
    if verb == "report":
        reads.append(("RUN_DIR", ns.run_dir))
    return reads


def test_examples_read_only_what_an_example_writes() -> None:
    parsed = _parsed()
    written = set().union(*(_written(chain, ns) for _, chain, ns in parsed))
    unmade = []
    for ex, chain, ns in parsed:
        for flag, path in _read(chain, ns):
            p = path.rstrip("/")
            if p.startswith(("/", "~")) or _placeholder(p) or p in written:
                continue  # the user's own file, a placeholder, or what an example writes
            unmade.append(f"{ex.where}: `asa3d {ex.text}`: {flag} {path} is written by no example")
    assert not unmade, "\n".join(unmade)


def test_the_check_catches_a_path_pretraining_never_writes() -> None:
    """The bug this guards against: --init runs/asa/checkpoints/last.pt (pretraining writes
    runs/asa/last.pt)."""
    pretrain = PARSER.parse_args(["pretrain", "--config", "pretrain/asa_tiny.yaml", "--out", "runs/asa"])
    bad = PARSER.parse_args(["finetune", "--init", "runs/asa/checkpoints/last.pt"])
    good = PARSER.parse_args(["finetune", "--init", "runs/asa/last.pt"])
    made = _written(["pretrain"], pretrain)
    assert _read(["finetune"], bad)[0][1] not in made and _read(["finetune"], good)[0][1] in made


def test_readme_states_no_test_count_that_can_go_stale() -> None:
    text = (REPO / "README.md").read_text()
    assert not re.search(r"\b\d+ tests\b", text), "the README counts tests: that number goes stale"
