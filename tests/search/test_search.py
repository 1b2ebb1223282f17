"""Merge search on the MiniLM tiny pool: the genome-to-parameter map, fitness checked by an independent evaluation,
resuming after the driver is killed, and the same results in this process, on a local Ray cluster and on one
started separately (``ray start --head``) and reached by its address."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

import numpy as np
import pytest

import nbmerge
from nbmerge.errors import ParameterError
from nbmerge.merge_search.space import space_from

RANGES = {"density": (0.2, 1.0), "scaling": (0.3, 1.5)}
FIXED = {"trim_scope": "tensor"}
SEARCH = dict(fixed=FIXED, population=4, seed=3)


def test_a_genome_maps_onto_per_model_anchors_and_shared_values():
    space = space_from("ties", {"density": "0.2:1.0", "scaling": (0.5, 1.5)}, n_models=3, blocks=2, fixed=FIXED)
    assert space.dimension == 3 * 2 + 2  # density: per model × block; scaling: one value × block
    genome = np.array([0.0, 1.0, 0.5, 0.25, 1.0, 1.0, 0.5, 2.0])  # the last gene is clipped to 1
    assert space.candidate(genome) == {"trim_scope": "tensor", "density": [[0.2, 1.0], [0.6, 0.4], [1.0, 1.0]],
                                    "scaling": [1.0, 1.5]}
    one_block = space_from("ties", {"density": (0.2, 1.0)}, n_models=2)
    assert one_block.candidate(np.array([0.5, 1.0])) == {"density": [0.6, 1.0]}
    with pytest.raises(ParameterError, match="no parameter 'densty'"):
        space_from("ties", {"densty": (0, 1)}, 2)
    with pytest.raises(ParameterError, match="low < high"):
        space_from("ties", {"density": (1, 0.5)}, 2)
    with pytest.raises(ParameterError, match="is a choice, not a number"):
        space_from("ties", {"sign": (0, 1)}, 2)


@pytest.fixture(scope="module")
def uninterrupted(tiny_zoo):
    return nbmerge.search("minilm-tiny", "ties", RANGES, generations=2, **SEARCH)


def test_fitness_is_the_merges_validation_accuracy_and_the_best_is_scored_on_test(uninterrupted, tiny_zoo):
    from nbmerge.workbench.evaluation import evaluate

    result = uninterrupted
    assert len(result.generations) == 2 and result.candidates == 8
    assert result.best_fitness == max(f for g in result.generations for f in g.fitness)
    pool = nbmerge.task_pool("minilm-tiny", progress=False)
    merged = nbmerge.merge("ties", pool.individual_models(), base=pool.base, progress=False, **result.best_params)
    assert evaluate(merged, pool, "validation", progress=False).average == pytest.approx(result.best_fitness)
    assert evaluate(merged, pool, "test", progress=False).accuracy == pytest.approx(result.test)
    # the recipe reruns the same merge through %%merge's parser
    from nbmerge.recipes import parse_recipe, run_recipe

    again = run_recipe(parse_recipe(result.recipe()), progress=False)
    assert all(np.allclose(again.state_dict[k], merged.state_dict[k]) for k in merged.state_dict)
    assert result.merge_seconds > 0 and result.eval_seconds > 0


DRIVER = textwrap.dedent("""
    import sys, nbmerge
    nbmerge.search("minilm-tiny", "ties", {ranges!r}, generations=5, checkpoint=sys.argv[1], **{search!r})
""")


def test_a_killed_search_resumes_from_its_checkpoint_as_if_never_stopped(uninterrupted, tmp_path):
    checkpoint = tmp_path / "search.json"
    driver = subprocess.Popen([sys.executable, "-c", DRIVER.format(ranges=RANGES, search=SEARCH), str(checkpoint)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        if checkpoint.exists() and len(json.loads(checkpoint.read_text())["generations"]) >= 1:
            break
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    recorded = json.loads(checkpoint.read_text())["generations"]
    assert 1 <= len(recorded) < 5
    resumed = nbmerge.search("minilm-tiny", "ties", RANGES, generations=2, checkpoint=checkpoint, **SEARCH)
    assert [g.genomes for g in resumed.generations] == [g.genomes for g in uninterrupted.generations]
    for ours, theirs in zip(resumed.generations, uninterrupted.generations):
        assert ours.fitness == pytest.approx(theirs.fitness)
    assert resumed.best_params == uninterrupted.best_params
    with pytest.raises(ParameterError, match="another search .*seed"):
        nbmerge.search("minilm-tiny", "ties", RANGES, generations=2, checkpoint=checkpoint,
                       **{**SEARCH, "seed": 4})


def test_ray_workers_on_a_local_cluster_score_as_this_process(uninterrupted):
    on_ray = nbmerge.search("minilm-tiny", "ties", RANGES, generations=1, workers=1, **SEARCH)
    first = uninterrupted.generations[0]
    assert on_ray.generations[0].genomes == first.genomes
    assert on_ray.generations[0].fitness == pytest.approx(first.fitness)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


REMOTE_DRIVER = textwrap.dedent("""
    import json, sys, nbmerge
    found = nbmerge.search("minilm-tiny", "ties", {ranges!r}, generations=1, workers=2, address=sys.argv[1],
                           **{search!r})
    print(json.dumps({{"genomes": found.generations[0].genomes, "fitness": found.generations[0].fitness}}))
""")


def test_a_separately_started_ray_head_is_reached_by_its_address(uninterrupted):
    """A driver process of its own (Ray keeps one cluster token per process) reaches a head started with
    ``ray start --head`` through its address; the head and the driver share the cluster's token."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        driver = subprocess.run([sys.executable, "-c", REMOTE_DRIVER.format(ranges=RANGES, search=SEARCH),
                                 f"127.0.0.1:{port}"], env=env, capture_output=True, text=True, timeout=900)
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert driver.returncode == 0, driver.stderr[-2000:]
    remote = json.loads(driver.stdout.strip().splitlines()[-1])
    assert remote["genomes"] == uninterrupted.generations[0].genomes
    assert remote["fitness"] == pytest.approx(uninterrupted.generations[0].fitness)


def test_greedy_soup_keeps_a_model_only_where_validation_does_not_drop(tiny_zoo):
    from nbmerge.workbench.evaluation import evaluate

    soup = nbmerge.greedy_soup("minilm-tiny")
    pool = nbmerge.task_pool("minilm-tiny", progress=False)
    models = pool.individual_models()
    alone = {name: evaluate(path, pool, "validation", progress=False).average for name, path in models.items()}
    assert soup.order == sorted(alone, key=lambda name: -alone[name])
    assert soup.validation == pytest.approx(alone)
    kept, best = [soup.order[0]], alone[soup.order[0]]
    for name, score, was_kept in soup.steps[1:]:
        average = nbmerge.merge("simple_average", {m: models[m] for m in kept + [name]}, progress=False)
        assert evaluate(average, pool, "validation", progress=False).average == pytest.approx(score)
        assert was_kept == (score >= best)
        if was_kept:
            kept, best = kept + [name], score
    assert soup.ingredients == kept
    uniform = nbmerge.merge("simple_average", models, progress=False)
    assert evaluate(uniform, pool, "test", progress=False).average == pytest.approx(soup.uniform_test)


def test_the_cli_names_what_a_search_lacks(capsys):
    from nbmerge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["search", "minilm-tiny"])
    assert exit_info.value.code == 2
    assert "give a METHOD and at least one --range NAME=LOW:HIGH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["search", "minilm-tiny", "ties", "--range", "density"])
    assert "--range 'density': expected NAME=VALUE" in capsys.readouterr().err
