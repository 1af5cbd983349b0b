"""IHE IOCM rejection notes: which Key Object Selections withdraw what, and what is left."""

from __future__ import annotations

import pytest

from bridge.mapping.records import InstanceRecord
from bridge.mapping.rejection import apply_rejections, rejection_note, rejection_notes
from tests.builders import rejection_note_json, series, study, uid

STUDY = uid(1)
CT, KO = uid(1, 1), uid(1, 9)
NOTE = uid(1, 9, 1)


def ct_instances(n: int, series_uid: str = CT) -> list[InstanceRecord]:
    return [
        InstanceRecord(f"{series_uid}.{i}", series_uid, "1.2.840.10008.5.1.4.1.1.2", i)
        for i in range(1, n + 1)
    ]


@pytest.mark.parametrize("reason", ["113001", "113037", "113038", "113039"])
def test_each_iocm_rejection_reason_makes_a_rejection_note(reason: str) -> None:
    note = rejection_note(rejection_note_json(STUDY, KO, NOTE, {CT: [f"{CT}.1"]}, reason=reason), STUDY)
    assert note is not None
    assert (note.uid, note.series_uid, note.reason) == (NOTE, KO, reason)
    assert note.withdrawn == {(CT, f"{CT}.1")}


def test_a_key_object_selection_of_another_meaning_withdraws_nothing() -> None:
    of_interest = rejection_note_json(STUDY, KO, NOTE, {CT: [f"{CT}.1"]}, reason="113000")  # "Of Interest"
    assert rejection_note(of_interest, STUDY) is None


def test_a_rejection_code_of_another_scheme_or_another_sop_class_is_no_note() -> None:
    assert rejection_note(rejection_note_json(STUDY, KO, NOTE, {CT: ["x"]}, scheme="99LOCAL"), STUDY) is None
    sr = rejection_note_json(STUDY, KO, NOTE, {CT: ["x"]}, sop_class="1.2.840.10008.5.1.4.1.1.88.11")
    assert rejection_note(sr, STUDY) is None


def test_references_to_another_study_withdraw_nothing_from_this_one() -> None:
    note = rejection_note(rejection_note_json(uid(2), KO, NOTE, {uid(2, 1): [f"{uid(2, 1)}.1"]}), STUDY)
    assert note is not None and note.withdrawn == frozenset()


def test_withdrawn_instances_leave_the_series_counts_and_the_study_counts() -> None:
    records = [series(series_uid=CT, instance_count=3), series(series_uid=KO, number=9, modality="KO")]
    listed = ct_instances(3) + [InstanceRecord(NOTE, KO, "1.2.840.10008.5.1.4.1.1.88.59", 1)]
    notes = rejection_notes([rejection_note_json(STUDY, KO, NOTE, {CT: [f"{CT}.2"]})], STUDY)

    left = apply_rejections(study(series_count=2, instance_count=4), records, listed, notes)

    assert [(s.uid, s.instance_count) for s in left.series] == [(CT, 2)], "the note's own series is not shown"
    assert (left.study.series_count, left.study.instance_count) == (1, 2)
    assert left.withdrawn == {f"{CT}.2", NOTE}, "one CT image and the note itself"
    assert [i.uid for i in left.instances] == [f"{CT}.1", f"{CT}.3"]


def test_a_series_left_empty_drops_out_and_a_study_left_empty_has_nothing() -> None:
    other = uid(1, 2)
    records = [series(series_uid=CT, instance_count=2), series(series_uid=other, number=2, instance_count=1)]
    listed = ct_instances(2) + ct_instances(1, other)
    note = rejection_notes([rejection_note_json(STUDY, KO, NOTE, {CT: [f"{CT}.1", f"{CT}.2"]})], STUDY)

    left = apply_rejections(study(), records, listed, note)
    assert [s.uid for s in left.series] == [other]

    everything = {CT: [f"{CT}.1", f"{CT}.2"], other: [f"{other}.1"]}
    gone = apply_rejections(
        study(), records, listed, rejection_notes([rejection_note_json(STUDY, KO, NOTE, everything)], STUDY)
    )
    assert gone.series == [] and gone.study.instance_count == 0


def test_a_note_naming_instances_already_gone_counts_only_what_is_there() -> None:
    notes = rejection_notes([rejection_note_json(STUDY, KO, NOTE, {CT: [f"{CT}.1", f"{CT}.99"]})], STUDY)
    left = apply_rejections(study(), [series(series_uid=CT, instance_count=3)], ct_instances(3), notes)
    assert left.series[0].instance_count == 2
    assert left.withdrawn == {f"{CT}.1"}
