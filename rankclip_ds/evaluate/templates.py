"""Prompt templates for zero-shot classification: OpenAI's 80 ImageNet prompts, one template, or a file.

A template is a string with ``{}`` where the class name goes (every ``{}`` is replaced; no other brace is
interpreted, so templates may contain literal braces elsewhere only if they are not ``{}``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["OPENAI_IMAGENET_TEMPLATES", "fill_template", "resolve_templates"]

# The 80 prompts of OpenAI's CLIP ImageNet zero-shot notebook ("Prompt_Engineering_for_ImageNet.ipynb"), in its order.
OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def resolve_templates(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Turn a templates setting into a list of templates.

    ``spec`` is ``"openai"`` (the 80 built-in prompts), a path to a text file (one template per line; blank lines and
    lines starting with ``#`` are ignored), a single template containing ``{}``, or a list of templates.
    """
    if isinstance(spec, (list, tuple)):
        templates = [str(t) for t in spec]
        source = "the templates list"
    elif spec == "openai":
        return list(OPENAI_IMAGENET_TEMPLATES)
    elif Path(spec).is_file():
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
        templates = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        source = f"templates file {spec!r}"
    elif "{}" in spec:
        return [spec]
    else:
        raise ValueError(
            f"templates={spec!r} is neither 'openai', nor an existing file, nor a template with '{{}}' for the class "
            "name. Fix: e.g. templates='a photo of a {}.' or templates='openai'"
        )
    if not templates:
        raise ValueError(f"{source} holds no template; write one per line, e.g. 'a photo of a {{}}.'")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"{source}: every template needs '{{}}' where the class name goes; without it: {bad[:3]}")
    return templates


def fill_template(template: str, classname: str) -> str:
    """``template`` with every ``{}`` replaced by ``classname``."""
    return template.replace("{}", classname)
