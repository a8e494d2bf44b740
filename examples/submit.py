#!/usr/bin/env python3
"""Submit a job file to Conveyor over AMQP and print the dispatcher's reply.

Usage: python3 examples/submit.py examples/diamond.json
Env:   CONVEYOR_AMQP_URL (one node's URL, not Conveyor's comma-separated
       list; default amqp://guest:guest@127.0.0.1:5672/%2f),
       CONVEYOR_PREFIX (default conveyor). Needs `pip install pika`.
"""
import json, os, sys, uuid
import pika

url = os.environ.get("CONVEYOR_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
prefix = os.environ.get("CONVEYOR_PREFIX", "conveyor")
with open(sys.argv[1], "rb") as f:
    body = f.read()

conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()
ch.confirm_delivery()  # basic_publish now waits for the broker's confirm
reply_q = ch.queue_declare(queue="", exclusive=True).method.queue  # server-named, auto-deleted
corr = str(uuid.uuid4())
ch.basic_publish(
    exchange="",  # the default exchange routes by queue name
    routing_key=f"{prefix}.submit",
    body=body,
    mandatory=True,  # raises pika.exceptions.UnroutableError if the queue does not exist
    properties=pika.BasicProperties(
        content_type="application/json", delivery_mode=2,  # persistent
        reply_to=reply_q, correlation_id=corr),
)
for method, props, reply in ch.consume(reply_q, auto_ack=True, inactivity_timeout=30):
    if method is None:
        sys.exit("no reply within 30 s: is a dispatcher running with prefix " + prefix + "?")
    if props.correlation_id == corr:
        print(reply.decode())  # {"job_id": "...", "accepted": true}
        break
conn.close()
sys.exit(0 if json.loads(reply)["accepted"] else 1)
