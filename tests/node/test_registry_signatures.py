"""Registry ops count only when signed by their own author, an enrolled device: forged ones change nothing."""

import os

import attrs

from node.trust.identity import DeviceIdentity, enrolment_record, registry_refusal, revocation_record
from tests.conftest import ManualClock, make_replica

FIRST, SECOND, THIRD = (DeviceIdentity(seed=os.urandom(32)) for _ in range(3))


def writer(identity: DeviceIdentity, clock: ManualClock):
    return make_replica(identity.device_id, clock)


def checked(device_id: str, clock: ManualClock):
    replica = make_replica(device_id, clock)
    replica.admit_registry_op = registry_refusal
    return replica


def test_enrolments_and_revocations_signed_by_their_author_are_applied(clock):
    first = writer(FIRST, clock)
    founding = first.enrol_device(FIRST.device_id, enrolment_record(FIRST, FIRST.device_id, FIRST.verify_key_bytes, "first"))
    enrolment = first.enrol_device(SECOND.device_id, enrolment_record(FIRST, SECOND.device_id, SECOND.verify_key_bytes, "b"))
    clock.now += 1
    revocation = first.revoke_device(SECOND.device_id, revocation_record(FIRST, SECOND.device_id, "lost", 0))
    observer = checked("observer", clock)
    result = observer.apply([founding, enrolment, revocation])
    assert result.refused == () and observer.devices.revoked_at(SECOND.device_id) == revocation.hlc


def test_forged_and_unsigned_registry_ops_are_refused_and_change_nothing(clock):
    first = writer(FIRST, clock)
    founding = first.enrol_device(FIRST.device_id, enrolment_record(FIRST, FIRST.device_id, FIRST.verify_key_bytes, "first"))
    observer = checked("observer", clock)
    observer.apply([founding])
    digest = observer.digest()
    # A revocation by the first device signed with another key, one naming another signer, one with no signature.
    forged = first.revoke_device(SECOND.device_id, revocation_record(THIRD, SECOND.device_id, "forged", 0))
    forged = attrs.evolve(forged, payload={**forged.payload, "signer": FIRST.device_id})
    other_signer = attrs.evolve(forged, payload=revocation_record(THIRD, SECOND.device_id, "x", 0))
    unsigned = attrs.evolve(forged, payload={"signer": FIRST.device_id})
    # A true revocation whose cut-off was raised after signing, to let more of the revoked device's ops count.
    signed = revocation_record(FIRST, SECOND.device_id, "lost", 0)
    raised = attrs.evolve(forged, payload={**signed, "cutoff_seq": 10**6})
    for op in (forged, other_signer, unsigned, raised):
        result = observer.apply([op])
        assert [refused for refused, _ in result.refused] == [op] and observer.digest() == digest
        assert observer.seq_of(FIRST.device_id) == 1  # not counted: offered again, refused again


def test_a_record_signed_by_a_device_not_enrolled_yet_passes_once_its_enrolment_arrives(clock):
    first, second = writer(FIRST, clock), writer(SECOND, clock)
    founding = first.enrol_device(FIRST.device_id, enrolment_record(FIRST, FIRST.device_id, FIRST.verify_key_bytes, "first"))
    second_enrolled = first.enrol_device(SECOND.device_id, enrolment_record(FIRST, SECOND.device_id, SECOND.verify_key_bytes, "b"))
    second.apply([founding, second_enrolled])
    clock.now += 1
    third_enrolled = second.enrol_device(THIRD.device_id, enrolment_record(SECOND, THIRD.device_id, THIRD.verify_key_bytes, "c"))
    observer = checked("observer", clock)
    assert observer.apply([third_enrolled]).refused  # its signer is unknown here
    observer.apply([founding, second_enrolled, third_enrolled])
    assert observer.devices.is_trusted(THIRD.device_id)
    assert observer.devices.enrolments.keys() == {d.device_id for d in (FIRST, SECOND, THIRD)}
