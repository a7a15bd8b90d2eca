"""The controller's view of a node's guests: its own changes outlive older tables."""

from __future__ import annotations

from controller.nodeview import NodeView
from honeyfleet.v1 import common_pb2

PRISTINE = common_pb2.GUEST_STATE_PRISTINE
LEASED = common_pb2.GUEST_STATE_LEASED


def guest(guest_id: str, state: common_pb2.GuestState.ValueType, *ips: str) -> common_pb2.Guest:
    return common_pb2.Guest(id=guest_id, state=state, src_ips=list(ips))


def test_a_table_sent_before_an_allocation_does_not_undo_it() -> None:
    view = NodeView("n1", capacity=4)
    view.apply_table(3, [guest("g1", PRISTINE), guest("g2", PRISTINE)], [])
    view.reserve()
    assert view.free == 1  # promised before the node answers
    view.unreserve()
    view.allocated(4, "L1", guest("g1", LEASED, "192.0.2.1"))
    assert (view.counts.pristine, view.counts.leased, view.free) == (1, 1, 1)
    # A heartbeat the node sent before it allocated (version 3) arrives late.
    view.apply_table(3, [guest("g1", PRISTINE), guest("g2", PRISTINE)], [])
    assert (view.counts.pristine, view.counts.leased) == (1, 1)
    assert view.lease_ids == {"L1"} and view.src_ips() == {"192.0.2.1"}
    # The next one includes it: the table alone now says so.
    view.apply_table(4, [guest("g1", LEASED, "192.0.2.1"), guest("g2", PRISTINE)], ["L1"])
    assert (view.counts.pristine, view.counts.leased) == (1, 1)


def test_a_table_sent_before_a_release_does_not_report_its_lease() -> None:
    view = NodeView("n1", capacity=4)
    view.apply_table(5, [guest("g1", LEASED, "192.0.2.1")], ["L1"])
    view.released(6, "L1")
    view.apply_table(5, [guest("g1", LEASED, "192.0.2.1")], ["L1"])
    assert view.lease_ids == set()


def test_a_refusal_counts_no_guest_until_a_newer_table() -> None:
    view = NodeView("n1", capacity=4)
    view.apply_table(2, [guest("g1", PRISTINE)], [])
    view.refused()
    assert view.free == 0
    view.apply_table(2, [guest("g1", PRISTINE)], [])
    assert view.free == 0
    view.apply_table(3, [guest("g1", PRISTINE)], [])
    assert view.free == 1


def test_a_node_cannot_report_more_guests_than_its_capacity() -> None:
    view = NodeView("n1", capacity=2)
    view.apply_table(1, [guest(f"g{i}", PRISTINE) for i in range(50)], [])
    assert view.counts.pristine == 2 and len(view.guests) == 2


def test_an_unversioned_node_has_its_table_replace_the_controllers_changes() -> None:
    view = NodeView("n1", capacity=4)
    view.apply_table(0, [guest("g1", PRISTINE), guest("g2", PRISTINE)], [])
    view.allocated(0, "L1", guest("g1", LEASED))
    assert view.counts.pristine == 1
    view.apply_table(0, [guest("g1", LEASED), guest("g2", PRISTINE)], ["L1"])
    assert (view.counts.pristine, view.counts.leased) == (1, 1)
