"""How tickets.jsonl was made: ``python -m deployments.classifier.data.generate_tickets``.

Hand-written ticket templates per category, filled from slot lists with a fixed seed.
The held-out split takes whole *templates* (the last four of each category), so the
classifier is scored on sentence shapes it never saw in training, not on re-fillings
of training sentences.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SLOTS = {
    "order": [f"#{n}" for n in (10234, 10488, 11872, 12345, 13007, 14550, 15123, 16789)],
    "product": [
        "Aurora desk lamp",
        "Nimbus headphones",
        "Terra backpack",
        "Pulse smartwatch",
        "Echo speaker",
        "Zephyr fan",
        "Orbit webcam",
        "Summit standing desk",
    ],
    "amount": ["$19.99", "$49.00", "$120.50", "$7.25", "$89.90", "$240.00"],
    "plan": ["Pro plan", "Basic plan", "Team plan", "annual subscription", "monthly plan"],
    "carrier": ["UPS", "FedEx", "DHL", "USPS", "the courier"],
    "city": ["Berlin", "Austin", "Lyon", "Osaka", "Toronto", "Leeds"],
    "error": [
        "error 500",
        "a blank white screen",
        "error code E42",
        "a timeout",
        "'unexpected token'",
        "a spinning wheel forever",
    ],
    "device": ["iPhone", "Android phone", "Windows laptop", "MacBook", "Chromebook", "iPad"],
    "days": ["3", "5", "10", "two", "several"],
}

OPENERS = ["", "", "Hi, ", "Hello, ", "Hey team, ", "Good morning. ", "Urgent: "]
CLOSERS = ["", "", " Thanks.", " Please help.", " Thank you in advance!", " Regards, Sam"]

TEMPLATES: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for my {plan} this month.",
        "My invoice shows {amount} but I expected less, can you explain the charge?",
        "Please refund the duplicate payment of {amount}.",
        "My credit card was declined when paying for the {plan}.",
        "How do I download a VAT invoice for order {order}?",
        "I cancelled but you still billed me {amount}.",
        "Can I switch the {plan} from monthly billing to yearly billing?",
        "The payment page keeps rejecting my card.",
        "Why is there a pending charge of {amount} on my bank statement?",
        "I need a receipt for my last payment for accounting.",
        "Your price went up and I was never told; I want the old price on my {plan}.",
        "Do you accept PayPal or bank transfer for the {plan}?",
        "The promo code did not apply and I paid full price of {amount}.",
        "I see an unknown charge of {amount} from your company on my card.",
        "Please update the billing address on my invoices.",
        "My bill this month is {amount} higher than usual.",
    ],
    "shipping": [
        "Where is my order {order}? It has not arrived yet.",
        "Tracking for order {order} has not updated in {days} days.",
        "{carrier} says the package was delivered but I never got it.",
        "Can you ship the {product} to {city}?",
        "How long does delivery to {city} usually take?",
        "My order {order} is stuck in customs.",
        "I need to change the delivery address for order {order}.",
        "The tracking number for order {order} does not work on the {carrier} site.",
        "Do you offer express delivery for the {product}?",
        "My parcel was left at the wrong house.",
        "When will order {order} be dispatched?",
        "The delivery estimate for my {product} keeps moving back.",
        "Is there free shipping to {city} on orders over {amount}?",
        "{carrier} returned my package to sender, order {order}.",
        "Only half of order {order} arrived, the rest is missing in transit.",
        "Can I pick up my {product} instead of waiting for delivery?",
    ],
    "technical": [
        "The app crashes on my {device} every time I open it.",
        "I get {error} when I try to sync my {product}.",
        "The {product} will not connect to wifi.",
        "The website shows {error} on checkout.",
        "Firmware update failed on my {product} and now it is stuck.",
        "Bluetooth pairing with my {device} keeps dropping.",
        "The dashboard is very slow and sometimes shows {error}.",
        "My {product} turns off randomly after a few minutes.",
        "After the latest update the app freezes on my {device}.",
        "The API returns {error} for every request since this morning.",
        "Notifications stopped working on my {device}.",
        "The {product} battery drains in one hour, is this a bug?",
        "I cannot install the desktop app, the installer shows {error}.",
        "Video from the {product} is black on my {device}.",
        "The integration stopped syncing data and logs show {error}.",
        "Export to CSV produces an empty file.",
    ],
    "account": [
        "I cannot log in to my account, it says my password is wrong.",
        "How do I reset my password?",
        "Please delete my account and all my data.",
        "I want to change the email address on my account.",
        "My account is locked after too many login attempts.",
        "How do I add a team member to my {plan}?",
        "I never received the verification email to activate my account.",
        "Can I merge my two accounts into one?",
        "How do I change my username?",
        "The two-factor code is not arriving on my phone, I cannot sign in.",
        "I want to transfer account ownership to a colleague.",
        "How do I update my profile name and phone number?",
        "My account shows someone else's name.",
        "I signed up with Google and now cannot log in with email.",
        "Please reactivate my deactivated account.",
        "How can I see which devices are signed in to my account?",
    ],
    "returns": [
        "I want to return the {product}, it is not what I expected.",
        "How do I start a return for order {order}?",
        "The {product} arrived damaged, I need a replacement.",
        "Can I exchange the {product} for a different color?",
        "I sent the {product} back {days} days ago, when do I get my refund?",
        "Is the return shipping label free?",
        "The {product} I received is the wrong size, I want to exchange it.",
        "What is your return policy for opened items?",
        "My return for order {order} was rejected, why?",
        "I received the wrong item in order {order} and want to send it back.",
        "Can I return a gift without the receipt?",
        "The {product} stopped working within warranty, I want a replacement.",
        "How many days do I have to return the {product}?",
        "Please send me a prepaid return label for order {order}.",
        "I returned the {product} but the refund has not appeared yet.",
        "Can I drop off my return at a store in {city}?",
    ],
    "product": [
        "Is the {product} compatible with my {device}?",
        "What is the difference between the {product} and the {product} pro?",
        "Does the {product} come with a charger?",
        "Is the {product} waterproof?",
        "When will the {product} be back in stock?",
        "What are the dimensions of the {product}?",
        "Which {plan} do you recommend for a small team?",
        "Does the {product} work without an internet connection?",
        "Can I use the {product} outdoors in winter?",
        "What colors does the {product} come in?",
        "Do you sell spare parts for the {product}?",
        "Is there a student discount on the {plan}?",
        "How loud is the {product} at full power?",
        "Does the {plan} include priority support?",
        "What warranty comes with the {product}?",
        "Can the {product} be mounted on a wall?",
    ],
    "security": [
        "I think my account was hacked, there are logins from {city} I do not recognise.",
        "I received a phishing email pretending to be from you.",
        "Someone changed my password without my permission.",
        "I want to report a security vulnerability in your website.",
        "There are orders on my account I did not place, order {order}.",
        "Is my card data stored securely on your servers?",
        "I got a suspicious text message asking for my login code.",
        "Please enable extra security on my account after a breach.",
        "My email was in a data leak, is my account at risk?",
        "Unknown device signed in to my account from {city}.",
        "Someone is impersonating your support team on social media.",
        "I clicked a suspicious link in an email that looked like yours.",
        "Do you support hardware security keys for login?",
        "An attacker may have my recovery codes, what should I do?",
        "I see a password reset email I did not request.",
        "How do you protect customer data from breaches?",
    ],
}

HELD_OUT_TEMPLATES = 4
FILLS_PER_TEMPLATE = 6


def generate(seed: int = 7) -> list[dict[str, str]]:
    rng = random.Random(seed)
    tickets = []
    for label, templates in TEMPLATES.items():
        for index, template in enumerate(templates):
            split = "test" if index >= len(templates) - HELD_OUT_TEMPLATES else "train"
            seen: set[str] = set()
            for _ in range(FILLS_PER_TEMPLATE * 4):
                text = template.format(**{k: rng.choice(v) for k, v in SLOTS.items()})
                text = rng.choice(OPENERS) + text + rng.choice(CLOSERS)
                if text in seen:
                    continue
                seen.add(text)
                tickets.append({"text": text, "label": label, "split": split})
                if len(seen) == FILLS_PER_TEMPLATE:
                    break
    return tickets


def main() -> None:
    out = Path(__file__).with_name("tickets.jsonl")
    tickets = generate()
    out.write_text("".join(json.dumps(t) + "\n" for t in tickets))
    print(f"wrote {len(tickets)} tickets to {out}")


if __name__ == "__main__":
    main()
