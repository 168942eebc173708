"""A small, real LangGraph agent used by `agentgate demo` and the end-to-end tests.

A model node (langchain-openai `ChatOpenAI` with one tool bound) and a tool node that posts
the model's note to a webhook. It is configured with nothing but the environment a team
already has: `HTTPS_PROXY` (the gateway, with the agent's OIDC token as the proxy password)
and `SSL_CERT_FILE` (the gateway's CA). The agent holds no real API key: the placeholder
below is stripped by the gateway, which injects the real one.

Run: `python -m addons.devkit.agent "question"`; prints one JSON line with the transcript.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from typing import Annotated, TypedDict

from langchain_core.messages import AnyMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode, tools_condition

WEBHOOK_URL = os.environ.get("DEMO_WEBHOOK_URL", "https://hooks.example.com/agent-events")
MODEL = os.environ.get("DEMO_MODEL", "gpt-4o-mini")


def post_webhook(note: str) -> str:
    """Post a short note about the user's request to the team's webhook."""
    body = json.dumps({"text": note, "source": "langgraph-demo"}).encode()
    req = urllib.request.Request(WEBHOOK_URL, data=body, method="POST",  # noqa: S310
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - configured https URL
        return f"webhook answered {resp.status}"


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def build_graph():
    webhook_tool = tool(post_webhook)
    # The key is a placeholder on purpose: the gateway strips it and injects the real one.
    llm = ChatOpenAI(model=MODEL, api_key="managed-by-agentgate", max_retries=0,
                     timeout=60).bind_tools([webhook_tool])

    def model(state: State) -> dict:
        return {"messages": [llm.invoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode([webhook_tool]))
    graph.add_edge(START, "model")
    # tools_condition routes to the tool node on a tool call, else to the end
    graph.add_conditional_edges("model", tools_condition)
    graph.add_edge("tools", "model")
    return graph.compile()


def run(question: str) -> dict:
    graph = build_graph()
    result = graph.invoke({"messages": [("user", question)]},
                          config={"configurable": {"thread_id": "demo-thread"}})
    transcript = []
    for m in result["messages"]:
        entry = {"role": m.type, "content": m.content}
        calls = getattr(m, "tool_calls", None)
        if calls:
            entry["tool_calls"] = [{"name": c["name"], "args": c["args"]} for c in calls]
        transcript.append(entry)
    return {"answer": result["messages"][-1].content, "transcript": transcript}


def main() -> int:
    question = " ".join(sys.argv[1:]) or "Tell the team the nightly build is green."
    try:
        out = run(question)
    except Exception as e:  # noqa: BLE001 - report any SDK error as one JSON line
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
