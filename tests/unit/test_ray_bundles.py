"""control/ray/bundles.py: a GroupSpec's placement-group bundles and the waiting message."""

from __future__ import annotations

from typing import Any

import pytest

from control.ray.bundles import NodeResources, bundles_for, check_spec, waiting_message
from control.ray.types import GroupSpec


def spec(**fields: Any) -> GroupSpec:
    return GroupSpec(model="m", engine_command="engine --port {port}", **fields)


def node(
    name: str, free_gpus: float, total_gpus: float = 2, free_cpus: float = 2, **extra: float
) -> NodeResources:
    return NodeResources(
        name=name,
        total={"GPU": total_gpus, "CPU": 2, **extra},
        free={"GPU": free_gpus, "CPU": free_cpus, **extra},
    )


class TestBundles:
    def test_one_gpu_bundle_per_worker_the_first_with_the_drivers_cpus(self) -> None:
        assert bundles_for(spec(tensor_parallel=2, pipeline_parallel=2)) == [
            {"GPU": 1.0, "CPU": 1.0},
            {"GPU": 1.0},
            {"GPU": 1.0},
            {"GPU": 1.0},
        ]

    def test_accelerator_type_is_a_sliver_of_every_bundle(self) -> None:
        assert bundles_for(spec(tensor_parallel=2, accelerator_type="H100")) == [
            {"GPU": 1.0, "CPU": 1.0, "accelerator_type:H100": 0.001},
            {"GPU": 1.0, "accelerator_type:H100": 0.001},
        ]

    def test_fractional_gpus_and_no_driver_cpus(self) -> None:
        assert bundles_for(spec(tensor_parallel=2, gpus_per_worker=0.5, driver_cpus=0)) == [
            {"GPU": 0.5},
            {"GPU": 0.5},
        ]

    def test_a_driver_already_on_a_node_pins_bundle_zero_there(self) -> None:
        assert bundles_for(spec(tensor_parallel=2), driver_node_ip="10.0.0.7") == [
            {"GPU": 1.0, "CPU": 1.0, "node:10.0.0.7": 0.001},
            {"GPU": 1.0},
        ]

    def test_vllm_takes_one_gpu_or_a_fraction_per_bundle(self) -> None:
        for gpus in (1.0, 0.5):
            check_spec(spec(workers="vllm", gpus_per_worker=gpus))
        check_spec(spec(workers="standin", gpus_per_worker=2.0))

    @pytest.mark.parametrize(
        ("fields", "names"),
        [
            ({"strategy": "BEST"}, "PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"),
            ({"tensor_parallel": 0}, "both must be at least 1"),
            ({"gpus_per_worker": 0.0}, "must be above 0"),
            ({"driver_cpus": -1.0}, "must be 0 or more"),
            ({"workers": "ghost"}, "standin, vllm"),
            ({"workers": "vllm", "gpus_per_worker": 2.0}, "set gpus_per_worker=1"),
            ({"workers": "vllm", "gpus_per_worker": 1.5}, "set gpus_per_worker=1"),
        ],
    )
    def test_a_bad_spec_names_the_fix(self, fields: dict[str, Any], names: str) -> None:
        with pytest.raises(ValueError, match=names):
            check_spec(spec(**fields))


class TestWaitingMessage:
    def test_strict_spread_counts_nodes_with_a_free_gpu(self) -> None:
        nodes = [node("node-a", 2), node("node-b", 0), node("head", 0, total_gpus=0)]
        assert waiting_message(spec(tensor_parallel=4, strategy="STRICT_SPREAD"), nodes) == (
            "4 bundles of {GPU: 1} (the first with 1 CPU): 2 GPUs free on 1 node (node-a); "
            "STRICT_SPREAD needs 4 nodes with a free GPU, 1 has one"
        )

    def test_pack_counts_gpu_slots(self) -> None:
        nodes = [node("node-a", 1), node("node-b", 2)]
        assert waiting_message(spec(tensor_parallel=8), nodes) == (
            "8 bundles of {GPU: 1} (the first with 1 CPU): 3 GPUs free on 2 nodes "
            "(node-a, node-b); PACK needs 8 free GPU slots, 3 free"
        )

    def test_strict_pack_names_the_most_free_on_one_node(self) -> None:
        nodes = [node("node-a", 1), node("node-b", 2)]
        assert waiting_message(spec(tensor_parallel=4, strategy="STRICT_PACK"), nodes) == (
            "4 bundles of {GPU: 1} (the first with 1 CPU): 3 GPUs free on 2 nodes "
            "(node-a, node-b); STRICT_PACK needs 4 GPUs on one node, the most free on one "
            "node is 2"
        )

    def test_only_nodes_with_the_accelerator_type_count(self) -> None:
        nodes = [node("node-a", 2, **{"accelerator_type:H100": 1}), node("node-b", 2)]
        assert waiting_message(spec(tensor_parallel=4, accelerator_type="H100"), nodes) == (
            "4 bundles of {GPU: 1} (the first with 1 CPU): 2 GPUs free on 1 node (node-a); "
            "1 of 2 nodes has accelerator_type:H100; PACK needs 4 free GPU slots, 2 free"
        )

    def test_no_gpus_anywhere(self) -> None:
        assert waiting_message(spec(driver_cpus=0), [node("head", 0, total_gpus=0)]) == (
            "1 bundle of {GPU: 1}: 0 GPUs free on 0 nodes; PACK needs 1 free GPU slot, 0 free"
        )

    def test_gpus_free_but_no_cpu_beside_them_for_the_driver(self) -> None:
        nodes = [node("node-a", 2, free_cpus=0.5)]
        assert waiting_message(spec(tensor_parallel=2), nodes) == (
            "2 bundles of {GPU: 1} (the first with 1 CPU): 2 GPUs free on 1 node (node-a); "
            "PACK needs 2 free GPU slots, 2 free; no node with a free GPU has 1 CPU free"
        )

    def test_fractional_workers_fit_several_to_a_gpu(self) -> None:
        nodes = [node("node-a", 1)]
        assert waiting_message(spec(tensor_parallel=4, gpus_per_worker=0.5), nodes) == (
            "4 bundles of {GPU: 0.5} (the first with 1 CPU): 1 GPU free on 1 node (node-a); "
            "PACK needs 4 free GPU slots, 2 free"
        )
