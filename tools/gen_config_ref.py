"""Generate docs/config.md, the configuration reference, from the config schema.

    python tools/gen_config_ref.py            # write docs/config.md
    python tools/gen_config_ref.py --check    # exit 1 if docs/config.md is stale

Every key of the typed config (moetrain/config/schema.py) gets a row: its dotted path, its
type, its default and its help. The help is the comment above or beside the field in the
schema's source (read with ``tokenize``, so the schema stays plain dataclasses); a field
right under another one that has a comment block above it and none of its own shares that
block. Enum types list their choices with the comments beside them. The default is what
``moetrain-train`` composes with no overrides (conf/train.yaml and the default options of
each group), so a preset that changes a schema default shows the value users get. The
config groups and their options come from conf/, each with its file's leading comment.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import enum
import io
import re
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "moetrain" / "config" / "schema.py"
CONF = ROOT / "conf"
OUT = ROOT / "docs" / "config.md"
FIX = "python tools/gen_config_ref.py"


# ----------------------------------------------------------------------------- comments
def _comment_lines(source: str) -> tuple[dict[int, str], dict[int, str]]:
    """(comment beside code, by line; comment-only line, by line)."""
    trailing, alone, code = {}, {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            (trailing if tok.start[0] in code else alone)[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                              tokenize.DEDENT, tokenize.ENDMARKER):
            for line in range(tok.start[0], tok.end[0] + 1):
                code.add(line)
    return trailing, alone


def _is_section_marker(text: str) -> bool:
    return text.startswith("---") or set(text) <= set("-= ")


def attach_comments(spans: list[tuple[int, int]], source_info) -> list[tuple[str, bool]]:
    """Help text for consecutive statements ``spans`` ((first line, last line), in order)
    of one block, and whether each one's text came from a comment block above it.

    A comment block between two statements belongs to the next one, except when both
    statements carry a comment beside them: then it continues the first one's comment.
    Comment lines after the last statement continue its comment."""
    trailing, alone = source_info
    n = len(spans)
    above: list[list[str]] = [[] for _ in range(n)]
    below: list[list[str]] = [[] for _ in range(n)]
    beside = [" ".join(trailing[ln] for ln in range(a, b + 1) if ln in trailing)
              for a, b in spans]
    for i, (first, last) in enumerate(spans):
        # the run of comment-only lines directly above this statement
        run, ln = [], first - 1
        while ln in alone:
            run.insert(0, ln)
            ln -= 1
        prev_last = spans[i - 1][1] if i else None
        if run and prev_last is not None and run[0] == prev_last + 1 and beside[i - 1] \
                and beside[i]:
            below[i - 1] = [alone[x] for x in run]  # continues the previous comment
        else:
            above[i] = [alone[x] for x in run]
    if spans:  # comment lines after the last statement continue its comment
        ln, run = spans[-1][1] + 1, []
        while ln in alone and beside[-1]:
            run.append(alone[ln])
            ln += 1
        below[-1] = run
    out = []
    for i in range(n):
        parts = [t for t in above[i] if not _is_section_marker(t)]
        parts += [beside[i]] if beside[i] else []
        parts += below[i]
        out.append((" ".join(p for p in parts if p), bool([t for t in above[i]
                                                           if not _is_section_marker(t)])))
    return out


# ----------------------------------------------------------------------------- schema
@dataclasses.dataclass
class Field:
    name: str
    type: str
    help: str
    see: str | None = None  # a field before it whose comment block covers this one too


@dataclasses.dataclass
class EnumInfo:
    name: str
    doc: str
    members: list[tuple[str, str]]  # (value, help)


def _names(text: str, field_name: str) -> bool:
    """Whether a comment block speaks of ``field_name``: it names it, or every word of it
    that is 4 letters or longer (``load`` of ``load_coef``)."""
    low = text.lower()
    words = [w for w in field_name.split("_") if len(w) >= 4]
    return field_name in text or (bool(words) and all(w in low for w in words))


def _node_span(node: ast.AST) -> tuple[int, int]:
    return node.lineno, node.end_lineno


def read_schema(source: str) -> tuple[dict[str, tuple[str, list[Field]]], dict[str, EnumInfo]]:
    """Dataclasses (name -> (docstring, fields)) and enums (name -> EnumInfo) of the
    schema's source, with the help text of every field and member."""
    info = _comment_lines(source)
    tree = ast.parse(source)
    enum_names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)
                  and any(ast.unparse(b) == "Enum" for b in n.bases)}
    enum_names |= {n.targets[0].id for n in tree.body if isinstance(n, ast.Assign)
                   and isinstance(n.value, ast.Call) and ast.unparse(n.value.func) == "Enum"}
    classes: dict[str, tuple[str, list[Field]]] = {}
    enums: dict[str, EnumInfo] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            is_enum = any(ast.unparse(b) == "Enum" for b in node.bases)
            is_dc = any(ast.unparse(d).startswith("dataclass") for d in node.decorator_list)
            doc = " ".join((ast.get_docstring(node) or "").split())
            if is_dc:
                stmts = [s for s in node.body if isinstance(s, ast.AnnAssign)]
                helps = attach_comments([_node_span(s) for s in stmts], info)
                fields, owner, owner_help = [], None, ""  # the field under a comment block
                for i, (s, (text, from_above)) in enumerate(zip(stmts, helps)):
                    name, type_str = s.target.id, ast.unparse(s.annotation)
                    adjacent = i > 0 and s.lineno == stmts[i - 1].end_lineno + 1
                    see = None
                    if from_above:
                        owner = name
                    elif text or not adjacent:
                        owner = None
                    elif owner and (type_str not in enum_names
                                    or _names(owner_help, name)):
                        see = owner  # the comment block above the field before it covers it
                    if from_above:
                        owner_help = text
                    fields.append(Field(name, type_str, text, see))
                classes[node.name] = (doc, fields)
            elif is_enum:
                stmts = [s for s in node.body if isinstance(s, ast.Assign)]
                helps = attach_comments([_node_span(s) for s in stmts], info)
                members = [(ast.literal_eval(s.value), h) for s, (h, _) in zip(stmts, helps)]
                enums[node.name] = EnumInfo(node.name, doc, members)
        elif (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
              and ast.unparse(node.value.func) == "Enum"):  # the functional API
            name = node.targets[0].id
            elts = node.value.args[1].elts
            helps = attach_comments([_node_span(e) for e in elts], info)
            members = [(ast.literal_eval(e.elts[1]), h) for e, (h, _) in zip(elts, helps)]
            enums[name] = EnumInfo(name, "", members)
    return classes, enums


# ----------------------------------------------------------------------------- defaults
def composed_defaults() -> tuple[dict, dict[str, str | None]]:
    """The config ``moetrain-train`` composes with no overrides (interpolations kept), and
    the default option of every config group."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from moetrain.config import register_configs

    register_configs()
    with initialize_config_module(config_module="moetrain.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    tree = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    del tree["hydra"]
    return tree, choices


def _fmt_value(v: object) -> str:
    if v is None:
        return "`null`"
    if isinstance(v, bool):
        return f"`{str(v).lower()}`"
    if isinstance(v, str):
        return f"`{v}`" if v else '`""`'
    if isinstance(v, list):
        return "`[" + ", ".join(str(x) for x in v) + "]`"
    return f"`{v!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ----------------------------------------------------------------------------- groups
def _leading_comment(path: Path) -> str:
    """The first comment paragraph of a YAML file (no ``@package`` line, no indented
    example lines)."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line[1:]
        if text.strip().startswith("@package"):
            continue
        if not text.strip() or text.startswith("   "):
            if out:
                break
            continue
        out.append(text.strip())
    return " ".join(out).rstrip(":")


def config_groups(choices: dict[str, str | None]) -> list[tuple[str, list[tuple[str, str]]]]:
    """conf/'s groups: (group, [(option, leading comment)]), in path order."""
    groups = []
    for d in sorted(p for p in CONF.rglob("*") if p.is_dir() and any(p.glob("*.yaml"))):
        group = d.relative_to(CONF).as_posix()
        options = [(f.stem, _leading_comment(f)) for f in sorted(d.glob("*.yaml"))]
        default = choices.get(group)
        options.sort(key=lambda o: o[0] != default)  # the default first
        groups.append((group, options))
    return groups


# ----------------------------------------------------------------------------- render
def _sections(classes, root: str = "Config"):
    """(dotted prefix, dataclass name) for the root and every nested dataclass, in field
    order, depth first."""
    out = [("", root)]
    for f in classes[root][1]:
        if f.type in classes:
            for prefix, name in _sections(classes, f.type):
                out.append((f"{f.name}.{prefix}" if prefix else f.name, name))
    return out


def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _schema_default(cls_name: str, field_name: str):
    from moetrain.config import schema

    f = {f.name: f for f in dataclasses.fields(getattr(schema, cls_name))}[field_name]
    if f.default is not dataclasses.MISSING:
        v = f.default
    elif f.default_factory is not dataclasses.MISSING:
        v = f.default_factory()
    else:
        return None
    return v.value if isinstance(v, enum.Enum) else v


def _type_cell(type_str: str, enums: dict[str, EnumInfo]) -> str:
    parts = [p.strip() for p in type_str.split("|")]
    shown = [f"[`{p}`](#{p.lower()})" if p in enums else f"`{p}`" for p in parts]
    return " \\| ".join(shown)


def render() -> str:
    classes, enums = read_schema(SCHEMA.read_text())
    defaults, choices = composed_defaults()
    sections = _sections(classes)
    title = {"": "top level"}
    lines = [
        "# Configuration reference",
        "",
        (f"<!-- Generated by tools/gen_config_ref.py from moetrain/config/schema.py and "
         f"conf/. Do not edit by hand: change the schema's comments, then run `{FIX}`. -->"),
        "",
        ("Every key `moetrain-train` accepts, as a Hydra override `key=value` (for example "
         "`train.steps=1000`). The type, the help and the choices come from the dataclasses "
         "in `moetrain/config/schema.py`; the default is what `moetrain-train` composes with "
         "no overrides (`conf/train.yaml` and the default option of each group). A value "
         "the schema rejects fails before any work starts, naming the field and the fix; "
         "cross-field rules are in `moetrain/config/validate.py`."),
        "",
        "## Contents",
        "",
        "- [Config groups](#config-groups)",
    ]
    for prefix, _ in sections:
        anchor = re.sub(r"[^a-z0-9_ -]", "", (prefix or "top level").lower()).replace(" ", "-")
        lines.append(f"- [`{prefix}`](#{anchor})" if prefix else f"- [top level](#{anchor})")
    lines += ["- [Choices](#choices)", "", "## Config groups", "",
              ("Pick an option with `group=option` (`moe/router=switch`); the default comes "
               "first. Each option is a YAML file in `conf/<group>/`."), "",
              "| group | option | what |", "|---|---|---|"]
    for group, options in config_groups(choices):
        for i, (name, text) in enumerate(options):
            mark = " (default)" if name == choices.get(group) else ""
            lines.append(f"| {'`' + group + '`' if i == 0 else ''} | `{name}`{mark} | "
                         f"{_cell(text) or '-'} |")
    for prefix, cls_name in sections:
        doc, fields = classes[cls_name]
        lines += ["", f"## `{prefix}`" if prefix else f"## {title['']}", ""]
        lines += [doc, ""] if doc else []
        lines += ["| key | type | default | help |", "|---|---|---|---|"]
        for f in fields:
            if f.type in classes:
                continue  # a section of its own
            key = f"{prefix}.{f.name}" if prefix else f.name
            value = _get(defaults, key)
            default = _fmt_value(value)
            schema_value = _schema_default(cls_name, f.name)
            if str(schema_value) != str(value):
                default += f" (schema: {_fmt_value(schema_value)})"
            text = f.help or (f"See `{prefix + '.' if prefix else ''}{f.see}`." if f.see else "")
            enum_names = [p.strip() for p in f.type.split("|") if p.strip() in enums]
            for e in enum_names:
                opts = ", ".join(f"`{v}`" for v, _ in enums[e].members)
                text = f"{text} One of {opts}." if text else f"One of {opts}."
            lines.append(f"| `{key}` | {_type_cell(f.type, enums)} | {default} | "
                         f"{_cell(text) or '-'} |")
    used = {p.strip() for _, fields in classes.values() for f in fields
            for p in f.type.split("|")}
    lines += ["", "## Choices", "", "The values of every enum-typed key.", ""]
    for name in sorted(n for n in enums if n in used):
        e = enums[name]
        lines += [f"### `{name}`", ""]
        lines += [e.doc, ""] if e.doc else []
        lines += [f"- `{v}`" + (f": {h}" if h else "") for v, h in e.members]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def check(path: Path = OUT) -> str | None:
    """None if ``path`` holds what :func:`render` writes; else a message naming the fix."""
    want = render()
    have = path.read_text() if path.is_file() else None
    if have == want:
        return None
    why = "is missing" if have is None else "is stale (moetrain/config/schema.py or conf/ changed)"
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} {why}: run `{FIX}`"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The reference lists every key of "
                                        "moetrain/config/schema.py; see the module docstring.")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the file differs from what would be written")
    ap.add_argument("--out", type=Path, default=OUT, help="the file (default docs/config.md)")
    args = ap.parse_args(argv)
    if args.check:
        msg = check(args.out)
        if msg:
            print(msg, file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(render())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
