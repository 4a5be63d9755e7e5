"""One declaration per option: the command line, the web UI's forms and the pipeline's keys show the same options.

Each surface is built from :mod:`captionkit.options`; an option declared there appears on all three
(proved by declaring one more, here, and rebuilding the three surfaces), and the rule "an option
that would do nothing is refused" reads its reasons from the declaration.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import pytest
import typer
from typer.testing import CliRunner

from captionkit import cli
from captionkit.core.declare import declared_options, option
from captionkit.core.errors import CaptionkitError
from captionkit.core.tagging import TagOptions
from captionkit.options import CAPTION, TAG, CaptionText, ModelOptions, Part, build_captioner
from captionkit.options.commands import EXPORT, INSPECT, RUN, UI
from captionkit.steps import captioner as captioner_step
from captionkit.steps import tagger as tagger_step
from captionkit.steps.registry import find_step_type
from captionkit.ui import forms


def cli_options(name: str) -> dict[str, list[str]]:
    """The options of a real `captionkit` command: parameter name → its flags."""
    command = typer.main.get_command(cli.app).commands[name]
    return {param.name: [*param.opts, *param.secondary_opts] for param in command.params if param.name != "path"}


@pytest.mark.parametrize(("command", "step", "core"), [
    (CAPTION, "captioner", (ModelOptions, CaptionText)),
    (TAG, "tagger", (TagOptions,)),
])
def test_cli_forms_and_pipeline_keys_expose_the_declared_options(command, step, core):
    on_cli = cli_options(command.name)
    in_form = {field.name: field for field in forms.declared_fields(command)}
    step_type = find_step_type(step)
    assert list(on_cli) == command.names("cli")
    assert list(in_form) == command.names("ui")
    assert step_type.keys == command.pipeline_keys()
    assert step_type.key_aliases == command.pipeline_aliases()
    # The options that pick and configure the model and write its text are on every surface, spelled alike.
    shared = [item.name for cls in core for item in declared_options(cls)]
    assert set(shared) <= set(on_cli) & set(in_form) & set(step_type.keys)
    for item in command.options():
        if item.name in on_cli:
            assert item.flag in on_cli[item.name], item.name
        if item.name in in_form:
            assert in_form[item.name].label == item.flag and in_form[item.name].help == item.help
            assert in_form[item.name].default == item.default, item.name
    # Only the command line's own reporting and the page's own progress view differ.
    assert set(on_cli) - set(in_form) <= {"quiet", "progress", "max_failures", "print_scores"}


@dataclass
class Extra:
    """An option declared in a test, as a new feature would declare it."""

    glossiness: float | None = option(None, "How glossy the caption is.", panel="Test options")


@pytest.mark.parametrize(("command", "step", "module", "reached_the_api"), [
    (CAPTION, "captioner", captioner_step, "unknown option 'glossiness'"),  # api.caption's own check
    (TAG, "tagger", tagger_step, "unexpected keyword argument 'glossiness'"),
])
def test_an_option_declared_once_appears_on_every_surface(monkeypatch, command, step, module, reached_the_api):
    monkeypatch.setattr(command, "parts", [*command.parts, Part(Extra)])
    try:
        module._register()  # the pipeline's keys, as importing the step module registers them
        assert find_step_type(step).keys["glossiness"] == (int, float)
        field = next(field for field in forms.declared_fields(command) if field.name == "glossiness")
        assert field.kind == "optional_float" and field.label == "--glossiness" and field.group == "Test options"
        # the command line: the real command body, given the declaration's parameters again
        real = getattr(cli, command.name)
        body = types.FunctionType(real.__code__, real.__globals__, command.name)
        body.__annotations__ = {"path": real.__annotations__["path"]}
        app = typer.Typer()
        app.command()(cli._declared(command)(body))
        runner = CliRunner()
        assert "--glossiness" in runner.invoke(app, ["--help"], terminal_width=200).output
        result = runner.invoke(app, ["missing-folder", "--glossiness", "0.5"])
        # the value reached the api (which has no such option: the test declared it nowhere else)
        assert result.exception is not None and reached_the_api in str(result.exception)
    finally:
        monkeypatch.undo()
        module._register()
    assert "glossiness" not in find_step_type(step).keys


# command → its function in cli.py
COMMAND_BODIES = {"inspect": "inspect_command", "run": "run_command", "export": "export_command", "ui": "ui_command"}


def cli_parameters(name: str) -> dict[str, object]:
    """The options (not the arguments) of a real `captionkit` command: parameter name → its Click parameter."""
    command = typer.main.get_command(cli.app).commands[name]
    return {param.name: param for param in command.params if isinstance(param, typer.core.TyperOption)}


@pytest.mark.parametrize("command", [INSPECT, RUN, EXPORT, UI], ids=["inspect", "run", "export", "ui"])
def test_inspect_run_export_and_ui_take_exactly_their_declared_options(command):
    """`inspect`, `run`, `export`, `ui`: flags, defaults and help panels on the command line are the declaration's."""
    on_cli = cli_parameters(command.name)
    assert list(on_cli) == command.names("cli") == command.names()
    for item in command.options():
        param = on_cli[item.name]
        assert item.flag in param.opts, item.name
        assert param.help == item.help and param.rich_help_panel == item.panel, item.name
        assert param.default == (None if isinstance(item.default, list | dict) else item.default), item.name
    if command is INSPECT:
        assert on_cli["json_report"].opts == ["--json"]
    if command is RUN:
        assert on_cli["config"].opts == ["--config"]
    # The page has no form for these commands (its inspection button and pipeline tab pass their own few
    # values; export and ui are command-line only); the form code builds what the declaration gives the page.
    assert [field.name for field in forms.declared_fields(command)] == command.names("ui") == []


@pytest.mark.parametrize(("command", "argument", "reached_the_api"), [
    (INSPECT, "dataset", "unexpected keyword argument 'glossiness'"),  # inspect_dataset's own signature
    (RUN, "pipeline", "unexpected keyword argument 'glossiness'"),  # run_pipeline's own signature
], ids=["inspect", "run"])
def test_an_option_declared_for_inspect_or_run_appears_on_the_command_line(monkeypatch, tmp_path, command, argument,
                                                                           reached_the_api):
    monkeypatch.setattr(command, "parts", [*command.parts, Part(Extra)])
    assert [field.name for field in forms.declared_fields(command)] == ["glossiness"]  # a form would show it
    real = getattr(cli, COMMAND_BODIES[command.name])
    body = types.FunctionType(real.__code__, real.__globals__, command.name, real.__defaults__)
    body.__annotations__ = {argument: real.__annotations__[argument]}
    app = typer.Typer()
    app.command()(cli._declared(command)(body))
    runner = CliRunner()
    help_text = runner.invoke(app, ["--help"], terminal_width=200).output
    assert "--glossiness" in help_text and "Test options" in help_text
    given = tmp_path / "pipeline.yaml"
    given.write_text("steps: []\n")
    result = runner.invoke(app, [str(given), "--glossiness", "0.5"])
    # the value reached the library (which has no such option: the test declared it nowhere else)
    assert result.exception is not None and reached_the_api in str(result.exception)


def test_an_option_that_would_do_nothing_is_refused_with_its_declared_reason():
    """Every captioner option that does nothing on a server is refused there, in the declaration's words."""
    refused = [item for item in declared_options(ModelOptions) if not item.applies_to("openai")]
    assert {item.name for item in refused} >= {"task", "min_pixels", "tensor_parallel_size", "device"}
    for item in refused:
        value = {bool: True, int: 2, float: 0.5}.get(item.value_type, "cuda")
        with pytest.raises(CaptionkitError) as error:
            build_captioner(model="served", backend="openai", base_url="http://127.0.0.1:9/v1", **{item.name: value})
        assert str(error.value) == f"{item.flag}: {item.refusal('openai')}"


def test_the_settings_that_enter_the_fingerprint_are_the_declared_ones():
    declared = {item.name for item in declared_options(TagOptions) if item.fingerprint}
    assert set(TagOptions().fingerprint()) == declared
    assert set(CaptionText().settings()) == {item.name for item in declared_options(CaptionText) if item.fingerprint}


GROUNDING = {"task": "<CAPTION_TO_PHRASE_GROUNDING>", "task_input": "a cat"}
FLORENCE_CHANGES = {  # option → (the settings before, the change)
    "task": ({}, {"task": "<OCR>"}), "task_input": (GROUNDING, {**GROUNDING, "task_input": "a dog"}),
    "num_beams": ({}, {"num_beams": 2}), "early_stopping": ({}, {"early_stopping": True}),
    "no_repeat_ngram_size": ({}, {"no_repeat_ngram_size": 3}), "max_new_tokens": ({}, {"max_new_tokens": 9}),
    "repetition_penalty": ({}, {"repetition_penalty": 1.2}), "dtype": ({}, {"dtype": "bf16"}),
    "attn_implementation": ({}, {"attn_implementation": "eager"}), "device": ({"device": "auto"}, {}),
    "cache_dir": ({}, {"cache_dir": "elsewhere"}),
}


def test_a_florence_option_changes_the_fingerprint_exactly_when_declared_to(tiny_florence):
    """The declaration's ``fingerprint`` says which options make a new caption (checked against the model's own)."""
    def fingerprint(settings):
        return build_captioner(model=str(tiny_florence), **{"device": "cpu", **settings}).fingerprint()

    checked = [item for item in declared_options(ModelOptions) if item.name in FLORENCE_CHANGES]
    assert len(checked) == len(FLORENCE_CHANGES)
    for item in checked:
        before, after = FLORENCE_CHANGES[item.name]
        assert (fingerprint(before) != fingerprint(after)) == item.fingerprint, item.name
