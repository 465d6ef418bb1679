"""A minimal renderer for the subset of Go/Helm template syntax that the
moat chart (deploy/helm/moat) uses, so the chart renders in tests without a
Helm binary (none is available from the package registries this project
may use). The subset is deliberately small; anything outside it is an
error naming the template and the offset, never silently passed through:

- actions `{{ X }}` with trim markers `{{-` / `-}}` (whitespace, newlines
  included, removed on that side, as in Go's text/template);
- `{{/* comment */}}`;
- values: `.Values.a.b`, `.Release.Name`, `.Release.Namespace`, `.Chart.Name`,
  `.Chart.Version`, `.Chart.AppVersion`, and "double-quoted" strings;
  a missing key is an error (Helm would print `<no value>`);
- pipelines `X | f | g` with the functions `quote`, `toYaml`,
  `indent N`, `nindent N` (Helm/Sprig semantics: toYaml sorts keys and drops
  the trailing newline, nindent = newline + indent);
- `{{ if X }} … {{ else }} … {{ end }}` with Go's truthiness (false, 0, nil,
  empty string / list / map are false).
"""

import re

import yaml

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.S)


class TemplateError(Exception):
    pass


def _lookup(ctx, path, where):
    cur = ctx
    for part in path.split(".")[1:]:
        if not isinstance(cur, dict) or part not in cur:
            raise TemplateError(f"{where}: {path}: no such value")
        cur = cur[part]
    return cur


def _to_text(v, where):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float, str)):
        return str(v)
    raise TemplateError(f"{where}: cannot print a {type(v).__name__} without toYaml")


def _indent(s, n):
    pad = " " * n
    return pad + s.replace("\n", "\n" + pad)


def _eval(expr, ctx, where):
    stages = [s.strip() for s in expr.split("|")]
    value = None
    for i, stage in enumerate(stages):
        words = stage.split()
        if not words:
            raise TemplateError(f"{where}: empty pipeline stage in {expr!r}")
        head, args = words[0], words[1:]
        if i == 0 and head.startswith(".") and not args:
            value = _lookup(ctx, head, where)
            continue
        if i == 0 and head.startswith('"') and stage.endswith('"'):
            value = stage[1:-1]
            continue
        if i == 0 and head == "toYaml" and len(args) == 1:
            value, head, args = _lookup(ctx, args[0], where), "toYaml", []
        if head == "quote" and not args:
            value = '"' + _to_text(value, where).replace("\\", "\\\\").replace('"', '\\"') + '"'
        elif head == "toYaml" and not args:
            value = yaml.safe_dump(value, default_flow_style=False, sort_keys=True).rstrip("\n")
        elif head in ("indent", "nindent") and len(args) == 1 and args[0].isdigit():
            text = _to_text(value, where)
            value = _indent(text, int(args[0]))
            if head == "nindent":
                value = "\n" + value
        else:
            raise TemplateError(f"{where}: unsupported pipeline stage {stage!r} (see tests/ops/gotemplate.py)")
    return value


def _truthy(v):
    return not (v is None or v is False or v == 0 or v == "" or v == [] or v == {})


def render(template, ctx, name="template"):
    """Render `template` with `ctx` ({"Values": …, "Release": …, "Chart": …})."""
    # Tokenise into text and actions, applying trim markers.
    tokens = []
    pos = 0
    for m in ACTION.finditer(template):
        text = template[pos:m.start()]
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        tokens.append(("text", text, pos))
        tokens.append(("action", m.group(2), m.start()))
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    tokens.append(("text", template[pos:], pos))
    if "{{" in "".join(t[1] for t in tokens if t[0] == "text"):
        raise TemplateError(f"{name}: unterminated action")

    out = []
    stack = []  # (taking_this_branch, any_branch_taken, offset)

    def active():
        return all(s[0] for s in stack)

    for kind, body, offset in tokens:
        where = f"{name}@{offset}"
        if kind == "text":
            if active():
                out.append(body)
            continue
        if body.startswith("/*"):
            if not body.endswith("*/"):
                raise TemplateError(f"{where}: unterminated comment")
            continue
        if body.startswith("if "):
            cond = _truthy(_eval(body[3:], ctx, where)) if active() else False
            stack.append([cond, cond, offset])
        elif body == "else":
            if not stack:
                raise TemplateError(f"{where}: else without if")
            stack[-1][0] = not stack[-1][1]
        elif body == "end":
            if not stack:
                raise TemplateError(f"{where}: end without if")
            stack.pop()
        else:
            if active():
                out.append(_to_text(_eval(body, ctx, where), where))
    if stack:
        raise TemplateError(f"{name}@{stack[-1][2]}: if without end")
    return "".join(out)
