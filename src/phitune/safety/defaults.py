"""Blocklists and patterns the local content filter ships with (`local.defaults: true`).

Phrase-level on purpose: a support or coding assistant says "kill the process",
"shoot me an email" and "execute the script" all day, so single everyday words
are at most `low` (reported, not blocked at the default `medium` threshold) and
what blocks is wording with a harmful target or intent. Matching is
case-insensitive on whole words; whitespace in a term matches any whitespace.

Slurs are deliberately not spelled out here: add the terms your users need in a
safety config (`local.blocklists.hate.high: [...]`). Extend, don't edit: a config's
blocklists and patterns add to these, and `local.defaults: false` drops them.
"""
from __future__ import annotations

# Groups that hate speech targets, for the hate patterns below (plural forms).
_GROUPS = (
    r"(?:jews|muslims|christians|hindus|sikhs|buddhists|atheists|catholics|arabs|africans|asians|blacks|whites|"
    r"latinos|hispanics|mexicans|indians|chinese|immigrants|refugees|migrants|foreigners|gays|lesbians|"
    r"homosexuals|trans people|transgender people|women|men|disabled people|roma|gypsies)"
)
# People as the target of an act: "kill the process" is a support question, "kill my neighbour" is not.
_RELATIONS = (r"(?:wife|husband|partner|girlfriend|boyfriend|ex|boss|manager|coworker|colleague|neighbou?r|father|"
              r"mother|dad|mom|mum|brother|sister|son|daughter|family|friend|teacher|classmates?|kids?|children|baby)")
_PEOPLE = (rf"(?:you|him|her|them|everyone|everybody|someone|somebody|people|a person|my {_RELATIONS}|"
           rf"the (?:president|police|cops|teacher|neighbou?rs?|kids|children|people|{_RELATIONS}))")
_HOW = r"(?:how (?:do i|to|can i|could i|would i|should i)|ways? to|best way to|easiest way to|teach me to|help me)"

# category -> severity -> phrases
BLOCKLISTS: dict = {
    "violence": {
        "high": ["pipe bomb", "nail bomb", "car bomb", "school shooting", "mass shooting", "mass murder",
                 "molotov cocktail", "improvised explosive device"],
        "medium": ["beat you to death", "beat him to death", "beat her to death", "slit your throat",
                   "blow up the building", "shoot up the school", "burn down the house"],
        "low": ["murder", "massacre", "bloodbath", "bloodshed", "gore", "torture", "assault rifle"],
    },
    "self_harm": {
        "high": ["suicide method", "suicide methods", "lethal dose", "painless way to die"],
        "medium": ["kill myself", "killing myself", "end my life", "ending my life", "take my own life",
                   "want to die", "wanna die", "hurt myself", "hurting myself", "cut myself", "cutting myself",
                   "harm myself", "self-harm", "self harm", "i am suicidal", "i'm suicidal"],
        "low": ["suicide", "suicidal", "self-injury", "overdose"],
    },
    "hate": {
        "high": ["ethnic cleansing", "final solution", "master race", "race war"],
        "medium": ["inferior race", "racial purity", "subhuman", "untermenschen", "go back to your country"],
        "low": ["racist", "bigot", "xenophobe", "supremacist"],
    },
    "sexual": {
        "high": ["child pornography", "child porn", "child sexual abuse material", "csam", "underage porn",
                 "sex with a minor", "sex with minors", "sex with a child"],
        "medium": ["porn", "porno", "pornography", "pornographic", "sexually explicit", "explicit sex",
                   "hardcore sex", "nude photos", "send nudes", "blowjob", "handjob", "gangbang"],
        "low": ["sexy", "erotic", "nsfw", "lingerie", "nude", "naked"],
    },
}

# {category, severity, regex}: Python regular expressions, matched case-insensitively.
PATTERNS: list = [
    # violence: intent or instructions to hurt people
    {"category": "violence", "severity": "high",
     "regex": rf"\b{_HOW} (?:kill|murder|poison|strangle|behead|shoot|stab) {_PEOPLE}\b"},
    {"category": "violence", "severity": "high",
     "regex": r"\b(?:how (?:do i|to|can i)|instructions (?:to|for)|help me) (?:make|build|assemble) "
              r"(?:a |an )?(?:bomb|explosive|explosives|grenade|pipe bomb)\b"},
    {"category": "violence", "severity": "high",
     "regex": rf"\bi(?:'m| am)? (?:going to|gonna|will|want to|wanna) (?:kill|murder|shoot|stab|strangle) {_PEOPLE}\b"},
    {"category": "violence", "severity": "medium",
     "regex": r"\b(?:kill|murder|shoot|stab|strangle|torture|behead)(?:s|ed|ing)? "
              r"(?:him|her|them|you|everyone|everybody|people|someone|somebody)\b(?! an? (?:email|message|note|line))"},
    # self-harm: intent and instructions
    {"category": "self_harm", "severity": "high",
     "regex": rf"\b{_HOW} (?:kill myself|commit suicide|end my life|hang myself|overdose|slit my wrists)\b"},
    {"category": "self_harm", "severity": "high",
     "regex": r"\bi(?:'m| am)? (?:going to|gonna|will|about to) (?:kill myself|end my life|end it all)\b"},
    # hate: dehumanising or eliminationist statements about a group
    {"category": "hate", "severity": "high",
     "regex": rf"\b(?:exterminate|eradicate|wipe out|kill|gas|get rid of) (?:all|the|every) (?:\w+ )?{_GROUPS}\b"},
    {"category": "hate", "severity": "medium",
     "regex": rf"\b(?:all )?{_GROUPS} (?:are|is) (?:vermin|subhuman|animals|parasites|inferior|filth|a disease|rats|cockroaches)\b"},
    # sexual: minors, always high
    {"category": "sexual", "severity": "high",
     "regex": r"\b(?:child|children|kid|kids|underage|minor|minors|preteen|pre-teen)s? "
              r"(?:porn|pornography|nudes|nude photos|sex|sexual content)\b"},
]
