"""Generate the sample support-ticket classification set shipped in data/.

    python data/make_tickets.py            # rewrites data/tickets_train.jsonl and data/tickets_valid.jsonl
    python data/make_tickets.py --check    # exit 1 if the committed files differ from what it generates

Each line is one ticket for Tasklane (the fictional SaaS of data/make_sample.py) and
its intent: billing, bug_report, account_access, shipping, cancellation or
feature_request (the smallest class, about 8%: a real imbalance). A ticket is an
opening, a templated request filled with customer details, and sometimes a closing;
a third of them come as a conversation ({"messages": [system, user]}), the rest as
{"text": ...}. Deterministic: one seeded random.Random, standard library only.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20261202
N_TRAIN = 420
N_VALID = 90
WEIGHTS = {"billing": 20, "bug_report": 20, "account_access": 18, "shipping": 17, "cancellation": 17, "feature_request": 8}
MESSAGES_RATE = 0.33
SYSTEM = "Classify the customer's support ticket by intent."

OPENINGS = ["", "", "Hi,", "Hello team,", "Hey there.", "Good morning,", "Hi support,", "Quick question:", "Urgent:",
            "Not happy right now.", "Hope you can help."]
CLOSINGS = ["", "", "", "Thanks!", "Thanks in advance.", "Regards, {name}", "Please reply soon.", "Cheers, {name}",
            "This is blocking my team."]

TEMPLATES = {
    "billing": [
        "I was charged twice for invoice {invoice} this month.",
        "Why is my bill {amount} higher than last month?",
        "Our card was charged {amount} but we are on the free plan.",
        "Can you send a corrected invoice for {company}? The VAT number is wrong.",
        "The invoice {invoice} lists {seats} seats but we only have {few} users.",
        "How do I change the credit card you bill each month?",
        "I need a receipt for the payment of {amount} on {date}.",
        "The annual plan price on my invoice does not match your pricing page.",
        "We were billed for the Business tier after downgrading to Starter.",
        "Please update the billing address on our account to {city}.",
    ],
    "bug_report": [
        "The board view crashes when I drag a card to the Done column.",
        "Since the update on {date} the app shows a blank page after login.",
        "Exporting a project to CSV gives an error 500.",
        "Notifications arrive twice for every comment.",
        "The calendar shows tasks on the wrong day in the {city} time zone.",
        "Attachments over {mb} MB fail to upload with a network error.",
        "Search returns nothing even for tasks I can see on the board.",
        "The mobile app freezes when I open a task with many subtasks.",
        "Dark mode makes the comment text unreadable, it is black on black.",
        "The Slack integration stopped posting updates to our channel.",
    ],
    "account_access": [
        "I can't log in, the password reset email never arrives.",
        "My account is locked after too many attempts, please unlock {email}.",
        "Single sign-on with our identity provider fails with an invalid assertion.",
        "I lost my phone and can't pass two-factor authentication.",
        "How do I change the email address I sign in with to {email}?",
        "A former employee still has admin rights, how do I remove them?",
        "The invite link for {name} says it has expired.",
        "I get 'access denied' when opening the {company} workspace.",
        "Please transfer ownership of the workspace from {name} to me.",
        "I forgot which email I used to register, can you look it up?",
    ],
    "shipping": [
        "Where is my order {order}? The hardware kit has not arrived.",
        "The tracking number for order {order} shows no movement since {date}.",
        "Our onboarding welcome box was delivered to the wrong address in {city}.",
        "The package arrived damaged, the badge scanner is broken.",
        "Can you ship the printed workbooks to our office in {city} instead?",
        "How long does delivery to {city} take for order {order}?",
        "Only {few} of the {seats} starter kits we ordered were in the parcel.",
        "The courier says order {order} is held at customs, what do I do?",
        "Can I change the delivery date of order {order} to next week?",
        "We received someone else's shipment with order number {order}.",
    ],
    "cancellation": [
        "Please cancel our subscription at the end of this billing period.",
        "We are moving to another tool, how do I close the {company} account?",
        "Cancel my plan and delete all our data please.",
        "I want to stop the automatic renewal before {date}.",
        "How do I end my trial so I am not charged?",
        "Our company is shutting down, please terminate the contract.",
        "I no longer need Tasklane, please cancel the account for {email}.",
        "Can we cancel {seats} seats and keep the rest of the plan?",
        "Please confirm that the plan of {company} is cancelled.",
        "Downgrade is not enough, I want to cancel completely.",
    ],
    "feature_request": [
        "It would be great to have a Gantt chart view for projects.",
        "Could you add an integration with our {tool} account?",
        "Please let us set recurring tasks every second Tuesday.",
        "We would love custom fields on tasks, like a budget column.",
        "Is there any plan to support offline mode in the mobile app?",
        "Suggestion: let guests comment without a full seat.",
    ],
}
NAMES = ["Ana", "Ben", "Chloe", "Dmitri", "Eva", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi", "Liam", "Mei"]
COMPANIES = ["Acme Ltd", "Brightside", "Corvid Labs", "Delta Foods", "Evergreen", "Fjord AS", "Globex", "Halcyon"]
CITIES = ["Lisbon", "Toronto", "Nairobi", "Osaka", "Berlin", "Austin", "Lyon", "Pune", "Dublin", "Santiago"]
TOOLS = ["GitHub", "Jira", "Salesforce", "Zendesk", "HubSpot", "Notion"]


def _fill(rng: random.Random, text: str) -> str:
    name = rng.choice(NAMES)
    seats = rng.randint(6, 60)
    return text.format(
        name=name, company=rng.choice(COMPANIES), city=rng.choice(CITIES), tool=rng.choice(TOOLS),
        invoice=f"INV-{rng.randint(10000, 99999)}", order=f"#{rng.randint(100000, 999999)}",
        amount=f"${rng.randint(12, 900)}.{rng.randint(0, 99):02d}", seats=seats, few=rng.randint(1, 5),
        mb=rng.choice([10, 25, 50, 100]), email=f"{name.lower()}@{rng.choice(['mail.com', 'corp.io', 'example.org'])}",
        date=f"{rng.choice(['March', 'May', 'July', 'October'])} {rng.randint(1, 28)}",
    )


def ticket(rng: random.Random, label: str) -> dict:
    parts = [rng.choice(OPENINGS), rng.choice(TEMPLATES[label]), rng.choice(CLOSINGS)]
    text = " ".join(_fill(rng, p) for p in parts if p)
    text = text.lower() if rng.random() < 0.1 else text  # some customers type in lower case
    if rng.random() < MESSAGES_RATE:
        return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}], "label": label}
    return {"text": text, "label": label}


def generate(n: int, rng: random.Random, seen: list) -> list[dict]:
    labels, weights = list(WEIGHTS), list(WEIGHTS.values())
    rows = []
    while len(rows) < n:
        row = ticket(rng, rng.choices(labels, weights)[0])
        if row not in rows and row not in seen:  # no duplicates, and no validation ticket seen in training
            rows.append(row)
    seen.extend(rows)
    return rows


def _lines(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = parser.parse_args(argv)
    rng, seen = random.Random(SEED), []
    out = {"tickets_train.jsonl": _lines(generate(N_TRAIN, rng, seen)),
           "tickets_valid.jsonl": _lines(generate(N_VALID, rng, seen))}
    here = Path(__file__).resolve().parent
    if args.check:
        stale = [name for name, text in out.items() if (here / name).read_text() != text]
        for name in stale:
            print(f"data/{name} differs from what data/make_tickets.py generates", file=sys.stderr)
        return 1 if stale else 0
    for name, text in out.items():
        (here / name).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
