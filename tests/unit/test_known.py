"""The API's memory of who is known and which vehicles are whose: a yes is kept for a
while, a no is asked again every time, an erasure makes it ask again."""

from collections.abc import Callable

from owner_api.known import KnownOwners


class Answers:
    """What the warehouse would say, and how often it was asked."""

    def __init__(self) -> None:
        self.owners: set[str] = set()
        self.vehicles: set[tuple[str, str]] = set()
        self.asked = 0
        self.during_ask: list[Callable[[], None]] = []

    def owner(self, owner: str) -> bool:
        self.asked += 1
        for step in self.during_ask:
            step()
        return owner in self.owners

    def vehicle(self, owner: str, vin: str) -> bool:
        self.asked += 1
        return (owner, vin) in self.vehicles


def known_with(answers: Answers, clock: list[float], capacity: int = 100) -> KnownOwners:
    return KnownOwners(
        answers.owner, answers.vehicle, ttl_s=30, capacity=capacity, clock=lambda: clock[0]
    )


def test_a_yes_is_kept_until_its_time_is_up():
    answers, clock = Answers(), [0.0]
    known = known_with(answers, clock)
    answers.vehicles.add(("o1", "V1"))
    assert known.owns_vehicle("o1", "V1") and answers.asked == 1
    answers.vehicles.clear()  # gone in the warehouse; still remembered for 30 s
    clock[0] = 29.9
    assert known.owns_vehicle("o1", "V1") and answers.asked == 1
    clock[0] = 30.0
    assert not known.owns_vehicle("o1", "V1") and answers.asked == 2


def test_a_no_is_asked_again_so_new_data_shows_at_once():
    answers, clock = Answers(), [0.0]
    known = known_with(answers, clock)
    assert not known.owner_known("o1")
    answers.owners.add("o1")
    assert known.owner_known("o1")
    assert answers.asked == 2


def test_an_owner_and_their_vehicles_are_separate_answers():
    answers, clock = Answers(), [0.0]
    known = known_with(answers, clock)
    answers.owners.add("o1")
    assert known.owner_known("o1")
    assert not known.owns_vehicle("o1", "V1")  # knowing the owner opens no vehicle
    assert not known.owns_vehicle("o2", "V1")


def test_forgetting_an_owner_makes_every_answer_about_them_asked_again():
    answers, clock = Answers(), [0.0]
    known = known_with(answers, clock)
    answers.owners |= {"o1", "o2"}
    answers.vehicles |= {("o1", "V1"), ("o2", "V2")}
    for ask in (
        lambda: known.owner_known("o1"),
        lambda: known.owns_vehicle("o1", "V1"),
        lambda: known.owns_vehicle("o2", "V2"),
    ):
        assert ask()
    answers.vehicles.clear()
    known.forget("o1")
    assert not known.owns_vehicle("o1", "V1")  # erased: asked again
    assert known.owns_vehicle("o2", "V2")  # another owner's yes stays


def test_a_yes_read_while_the_owner_is_forgotten_is_not_kept():
    """An erasure may delete the rows right after a request read its yes: that yes must
    not outlive the erasure's forget."""
    answers, clock = Answers(), [0.0]
    known = known_with(answers, clock)
    answers.owners.add("o1")
    answers.during_ask = [lambda: known.forget("o1")]
    assert known.owner_known("o1")  # this request's answer stands
    answers.during_ask = []
    answers.owners.clear()
    assert not known.owner_known("o1")  # but it was not remembered


def test_memory_is_bounded_oldest_yes_first():
    answers, clock = Answers(), [0.0]
    known = known_with(answers, clock, capacity=3)
    answers.vehicles |= {("o", f"V{i}") for i in range(5)}
    for i in range(5):
        assert known.owns_vehicle("o", f"V{i}")
    answers.asked = 0
    assert known.owns_vehicle("o", "V4") and answers.asked == 0
    assert known.owns_vehicle("o", "V0") and answers.asked == 1  # pushed out, asked again
