"""Prompts the slow tier's batching tests serve together: distinct topics, so one request's text
can never pass for another's."""

PROMPTS = (
    "Write a short poem about the moon.",
    "List three facts about elephants.",
    "Explain what a computer keyboard is.",
    "Describe a busy market in the morning.",
)
