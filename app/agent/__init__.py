"""The work layer: agent runs, the LLM providers they call, and their tools."""
