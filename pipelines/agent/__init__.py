"""Support-triage agent: classify and route a ticket, then let the LLM work it with tools."""
