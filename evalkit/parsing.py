"""Modifier-noun word groups from a dependency parse, by SynGen's rules (Rassin et al., NeurIPS 2023).

spaCy is an optional dependency (`pip install evalkit[parse]`, then `python -m spacy download en_core_web_trf`):
this module imports it only when a parser is loaded. The rules read only what spaCy's `Token` offers (`i`,
`text`, `pos_`, `dep_`, `children`), so they run on any parse with those attributes.

The rules, as SynGen's official code applies them:

1. Each noun (NOUN/PROPN) that is not itself a modifier collects its modifier children (dependencies
   `MODIFIER_DEPS`) and, depth-first, their modifier and `conj` descendants: "a red and blue car".
2. An auxiliary verb (AUX) whose children include a noun and a modifier binds them: "the car is red".
3. As rule 1 with relative clauses (`relcl`) as modifiers too, keeping their non-verb descendants: "a dog that is
   red". Verbs themselves never join a group.
4. With `include_entities`, every noun alone (SynGen then pushes its map away from the rest of the prompt).

Groups that share a word are merged; the noun is the last word of each group. Two deliberate differences from
the official code (see tests/fixtures/syngen/README.md): rule 3 examines every noun (the official returns after
the first noun it reaches), and rule 2 puts the noun last (the official leaves it first, where its loss takes
the last word as the noun).
"""

from __future__ import annotations

import functools

from evalkit.errors import ConfigError

MODIFIER_DEPS = ("amod", "nmod", "compound", "npadvmod", "advmod", "acomp")
NOUN_POS = ("NOUN", "PROPN")
VERB_POS = ("AUX", "VERB")
DOWNLOAD_HINT = "python -m spacy download {model}"


@functools.lru_cache(maxsize=2)
def load_parser(model: str):
    """The spaCy pipeline `model`, loaded once per process (a model, not per-prompt state)."""
    try:  # spaCy is optional (the `parse` extra): only SynGen without given groups needs it
        import spacy
    except ImportError:
        raise ConfigError(f"spaCy is not installed: pip install evalkit[parse] && {DOWNLOAD_HINT.format(model=model)}") from None
    try:
        return spacy.load(model)
    except OSError:
        raise ConfigError(f"the spaCy model {model} is not installed: {DOWNLOAD_HINT.format(model=model)}") from None


def _descendant_modifiers(stack: list, deps: tuple[str, ...], skip_pos: tuple[str, ...]) -> list:
    """Depth-first (last pushed first) through modifier and `conj` links; words with `skip_pos` are passed through."""
    found = []
    while stack:
        node = stack.pop()
        if node.dep_ in deps or node.dep_ == "conj":
            if node.pos_ not in skip_pos:
                found.append(node)
            stack.extend(node.children)
    return found


def _noun_groups(doc, deps: tuple[str, ...], skip_pos: tuple[str, ...]) -> list[list]:
    """Rules 1 and 3: each noun with its modifiers (children first, then their descendants), noun last."""
    groups = []
    for word in doc:
        if word.pos_ not in NOUN_POS or word.dep_ in deps:
            continue
        modifiers, stack = [], []
        for child in word.children:
            if child.dep_ in deps:
                if child.pos_ not in skip_pos:
                    modifiers.append(child)
                stack.extend(child.children)
        modifiers += _descendant_modifiers(stack, deps, skip_pos)
        if modifiers:
            groups.append(modifiers + [word])
    return groups


def _copula_groups(doc) -> list[list]:
    """Rule 2: an AUX with a noun child and a modifier child ("the car is red"); nouns go last."""
    groups = []
    for word in doc:
        if word.pos_ != "AUX" or word.dep_ in MODIFIER_DEPS:
            continue
        members, stack = [], []
        for child in word.children:
            if child.dep_ in MODIFIER_DEPS or child.pos_ in NOUN_POS:
                if child.pos_ not in VERB_POS:
                    members.append(child)
                stack.extend(child.children)
        if len(members) < 2:
            continue
        members += _descendant_modifiers(stack, MODIFIER_DEPS, ("AUX",))
        groups.append([w for w in members if w.pos_ not in NOUN_POS] + [w for w in members if w.pos_ in NOUN_POS])
    return groups


def merge_overlapping(groups: list[list[int]]) -> list[list[int]]:
    """Merge groups that share a word until none do; a merged group keeps the earlier group's order first."""
    groups = [list(g) for g in groups]
    changed = True
    while changed:
        changed = False
        merged = []
        while groups:
            first = groups.pop(0)
            for k, other in enumerate(groups):
                if set(first) & set(other):
                    groups[k] = first + [w for w in other if w not in first]
                    changed = True
                    break
            else:
                merged.append(first)
        groups = merged
    return groups


def modifier_noun_groups(doc, include_entities: bool = False) -> list[tuple[str, ...]]:
    """The words of each group (modifiers, then the noun) that rules 1-4 find in a parsed prompt."""
    groups = (
        _noun_groups(doc, MODIFIER_DEPS, skip_pos=())
        + _copula_groups(doc)
        + _noun_groups(doc, MODIFIER_DEPS + ("relcl",), skip_pos=VERB_POS)
    )
    if include_entities:
        groups += [[word] for word in doc if word.pos_ in NOUN_POS]
    merged = merge_overlapping([[word.i for word in group] for group in groups])
    return [tuple(doc[i].text for i in group) for group in merged]


def parse_groups(prompt: str, model: str, include_entities: bool = False) -> list[tuple[str, ...]]:
    """Parse `prompt` with the spaCy pipeline `model` and return its modifier-noun groups."""
    return modifier_noun_groups(load_parser(model)(prompt), include_entities)
