"""Feedback: the durable journal that makes an acknowledged item impossible to lose."""

from claas_ray.feedback.journal import FeedbackEntry, FeedbackJournal

__all__ = ["FeedbackEntry", "FeedbackJournal"]
