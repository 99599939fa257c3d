"""
The report labeler: CheXpert's 14 observations (Irvin et al. 2019 order) from free-text radiology reports, in the
spirit of the CheXpert labeler / NegBio, with its rules in one table (RULES) and its negation and uncertainty cues
beside it. label_reports(texts) -> float32 (N, 14): 1 positive, 0 negated, -1 uncertain, NaN not mentioned.
A leaf: text_data.py (report metrics, --label_eval against IU X-ray's MeSH tags) and phantom.py use it.
"""

import re

import numpy as np

# CheXpert's 14 observations from free text, in the spirit of the CheXpert labeler
# (Irvin et al. 2019) and NegBio (Peng et al. 2018), written here as regular expressions:
#   0. sections: what follows an INDICATION / HISTORY / COMPARISON / TECHNIQUE header is not labelled (CheXpert labels
#      the impression; the indication is the question, not the answer), up to the next header or blank line;
#   1. mention: a phrase of RULES (what a radiologist writes for the observation) inside a sentence clause
#      (sentences end at '.', ';', '?', '!'; clauses at 'but', 'however', 'although', 'except', 'which', 'with',
#      ', there is', ':'); a phrase of NORMAL ("heart size is normal") is a negated mention (0) of its observation;
#   2. none when a HYPOTHETICAL cue precedes it ("to evaluate for", "if", "history of": no finding on this image), else
#      uncertain (-1) when an UNCERTAIN_FIRST cue ("cannot be excluded", "rule out") is near it, else negated (0)
#      when a NEGATION cue precedes it in the clause ("no", "without", "free of"), sits inside it ("heart is not
#      enlarged") or follows it ("has resolved", "within normal limits"), else uncertain (-1) on an UNCERTAIN cue
#      ("possible", "may", "suspicious for", "versus"), else positive (1);
#   3. per report: positive if any mention is positive, else uncertain if any is, else negated if any is, else NaN;
#      "No Finding" = 1 when no pathology (the 12 between it and Support Devices) is positive or uncertain, else 0.
# Phrases before a cue that only look like one ("no change in", "without interval change", "not only") are blanked;
# a negation that follows what it negates ("is not seen", "no longer present") does not negate what comes after it.

OBSERVATIONS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                "Fracture", "Support Devices"]  # CheXpert's order (its train.csv columns)
PATHOLOGIES = OBSERVATIONS[1:13]  # what makes "No Finding" 0 (Support Devices do not, as in CheXpert)

_HEART = r"(?:heart|cardiac (?:silhouette|shadow|size|contour|diameter)|cardiac)"
_BIG = r"(?:enlarge(?:d|ment)|increased in size|large|prominent|globular)"
_NODULE = r"nodules?|nodular (?:densit(?:y|ies)|opacit(?:y|ies)|opacification)"  # CheXpert's; not "nodular hilum"
_CP = r"(?:costophrenic|cp) (?:angles?|sulc[iu]s|recess(?:es)?|xxxx)"  # XXXX: the collection's anonymiser ate a word
# observation -> the phrases that mention it (lower-case regular expressions; \b word boundaries are added)
RULES = {
    "Enlarged Cardiomediastinum": [r"(?:widen\w*|enlarge\w*|prominent) (?:of )?(?:the )?(?:superior )?(?:cardio)?mediastin\w*",
                                   r"(?:cardio)?mediastin\w*(?: silhouette| contour)? (?:\w+ ){0,3}?(?:widen\w*|enlarged|prominent)"],
    "Cardiomegaly": [r"cardiomegaly", rf"{_BIG} (?:\w+ ){{0,3}}?{_HEART}", rf"{_HEART} (?:\w+ ){{0,4}}?{_BIG}"],
    "Lung Opacity": [r"opacit(?:y|ies)", r"opacifi\w*", r"infiltrat(?:e|es|ion|ions)", r"air ?space (?:disease|process)",
                     r"densit(?:y|ies)"],
    # CheXpert's list (mass, nodule, nodular density / opacity / opacification, lump, cavitary lesion, carcinoma,
    # neoplasm, tumor) + a lesion or cancer the report places in the lung. Not bare "nodular" (nodular interstitial
    # pattern, nodular hilum), "lesion" (bone, skin), "malignancy" / "metastatic" (breast, bone) or "cavitation".
    "Lung Lesion": [_NODULE, r"mass(?:es)?", r"lumps?", r"tumou?rs?", r"neoplasms?", r"carcinoma",
                    r"(?:lung|pulmonary|parenchymal|cavitary) lesions?",
                    r"(?:lung|pulmonary|bronchogenic) (?:cancer|malignancy|metastas[ie]s)"],
    "Edema": [r"o?edema", r"(?:vascular|pulmonary|venous|interstitial) (?:\w+ )?congestion", r"congestive",
              r"heart failure", r"chf", r"fluid overload", r"kerley", r"cephalization",
              r"(?:vascular|venous) (?:engorgement|redistribution|prominence|indistinct\w*)",
              r"(?:prominen\w*|engorge\w*|increased|indistinct\w*) (?:of )?(?:the )?(?:\w+ )?(?:pulmonary |lung )?vascula\w*",
              r"(?:pulmonary|lung) vascula\w* (?:\w+ ){0,2}?(?:prominen\w*|engorge\w*|congest\w*|indistinct\w*|increased)"],
    "Consolidation": [r"consolidat\w*"],
    "Pneumonia": [r"(?:broncho)?pneumonias?", r"pneumonitis", r"infection", r"infectious"],
    "Atelectasis": [r"atelecta\w*", r"(?:lobar|lobe|lung) collapse", r"collapse of the (?:\w+ ){0,2}?(?:lobe|lung)"],
    "Pneumothorax": [r"(?:hydro)?pneumothora(?:x|ces)"],
    "Pleural Effusion": [r"(?<!pericardial )effusions?", r"pleural fluid", r"hydrothorax",
                         rf"(?:blunt\w*|obliterat\w*) (?:of )?(?:the |both )?(?:\w+ )?{_CP}",
                         rf"{_CP} (?:\w+ ){{0,3}}?(?:blunt\w*|obliterat\w*)", rf"blunted (?:\w+ )?{_CP}"],
    "Pleural Other": [r"pleural (?:thickening|plaques?|scar\w*|calcification)", r"pleur(?:o|al)-?(?:parenchymal|peripheral) (?:scar\w*|thickening)",
                      r"fibrothorax", r"apical (?:pleural )?(?:cap|capping|thickening)"],
    "Fracture": [r"fractur\w*"],
    "Support Devices": [r"tubes?", r"catheters?", r"picc", r"(?:central|venous|jugular|subclavian|arterial|dialysis|ij) lines?",
                        r"pacemaker", r"pacer", r"defibrillator", r"aicd", r"pacing (?:leads?|wires?)",
                        r"(?:cardiac|transvenous|pacemaker) leads?", r"port-?a-?cath", r"drains?", r"stents?",
                        r"(?:prosthetic|artificial|mechanical) (?:\w+ )?valve", r"valve (?:replacement|prosthesis)",
                        r"(?:monitor|monitoring|ekg|ecg) leads?", r"icd", r"generator", r"stimulators?", r"tip",
                        r"surgical clips?", r"hardware", r"anchors?", r"(?:medical )?devices?", r"(?:loop|event) recorder"],
    # beyond CheXpert's 14 (label_reports(texts, ["Nodule", ...])); they never change "No Finding":
    "Nodule": [_NODULE],  # a granuloma is not a nodule unless the report calls it one
    "Emphysema": [r"emphysema\w*", r"hyperinfla\w*", r"hyperexpan\w*", r"hyperaera\w*", r"over-?inflat\w*",
                  r"copd", r"chronic obstructive", r"flatten\w* (?:of )?(?:the )?(?:\w+ )?(?:hemi)?diaphragms?"],
    "Granuloma": [r"granuloma\w*"],
}
# observation -> phrases that say it is normal: a negated mention (0), as CheXpert's negation of "heart size" by
# "normal" does. Not "upper limits of normal" / "top normal" (borderline), not across "not" or a word of enlargement.
_NORMAL = r"(?<!limits of )(?<!limit of )(?<!limits )(?<!limit )(?<!top )(?<!upper )(?:normal|unremarkable|" \
          r"within (?:the )?(?:normal limits|limits of normal))"
_NOT_NORMAL = r"(?!not\b|enlarg|large\b|increased\b|prominen|globular|widen|upper\b|top\b|borderline\b)"
_HEART_SEEN = r"(?:heart(?! failure)|(?:cardiac|cardio ?mediastinal)(?: and mediastinal)? (?:size|silhouettes?|" \
              r"contours?|shadow|configuration))"  # what a reader looks at to judge the heart's size
_MEDIASTINUM = r"(?:cardio ?)?mediastin(?:um|al)(?: (?:silhouettes?|contours?|size|width))?"
NORMAL = {c: [rf"{seen}(?:\W+{_NOT_NORMAL}\w+){{0,10}}?\W+{_NORMAL}",  # "heart size is normal", a clause
              rf"{_NORMAL}(?:[ -]+{_NOT_NORMAL}\w+){{0,5}}?[ -]+{seen}"]  # "normal heart size", a noun phrase
          for c, seen in (("Cardiomegaly", _HEART_SEEN), ("Enlarged Cardiomediastinum", _MEDIASTINUM))}
# mentions that are something else: blanked before matching
NOT_MENTIONS = r"(?:bone|osseous|soft tissue|breast|nipple|mineral) densit(?:y|ies)|(?:lytic|sclerotic|blastic|bon[ey]|" \
               r"osseous|skin|cutaneous) lesions?|mass effect|(?:thyroid|breast|neck|abdominal|soft tissue|" \
               r"pericardial|mediastinal|pleural|chest wall|cardiac|adrenal|renal|hepatic|muscle) mass(?:es)?|" \
               r"(?:(?<=granulomatous )|(?<=prior )|(?<=previous )|(?<=old )|(?<=sequela of )|(?<=sequelae of ))" \
               r"infection|(?:paratracheal|mediastinal|retrosternal|soft tissue) (?:opacit\w*|densit\w*)|" \
               r"(?:soft tissue|subcutaneous) (?:o?edema|emphysema)|" \
               r"(?:nasogastric|ng|enteric) tube \w+ (?:is )?not|air ?space disease (?:is )?not"
PSEUDO = r"\bno (?:\w+ )?change|\bwithout (?:\w+ )?change|\bnot only\b"
# negations that follow what they negate ("the catheter is not seen"): not a negation of what comes after them
POST_ONLY = r"\b(?:not|no longer)\W+(?:been\W+|be\W+)?(?:seen|identified|present|visuali[sz]ed|evident|demonstrated|" \
            r"appreciated|visible|noted)\b"
# the mention names no finding on this image: a question ("to evaluate for", "if"), a search ("detection of") or the
# patient's past ("history of"); CheXpert's labeler does not label the indication for the same reason. Not "whether":
# "unclear whether this is atelectasis or pneumonia" is uncertain
HYPOTHETICAL = r"\b(?:if|(?:evaluat|assess|correlat|screen)\w* (?:\w+ )?for|(?:look|search)\w* for|" \
               r"detect(?:ing|ion)|history of)\b"
NEGATION = r"\b(?:no|not|without|negative for|free of|clear of|absence of|absent|resolution of|resolved|removal of|" \
           r"removed|rather than|nor|neither|never)\b"
NEGATION_AFTER = r"^\W*(?:\w+\W+){0,3}?(?:(?:is|are|has|have|was|were)\W+)?(?:been\W+)?(?:resolved|cleared|removed|" \
                 r"absent|not (?:seen|identified|present|visuali[sz]ed|evident|demonstrated|appreciated)|no longer)|" \
                 r"^\W*(?:\w+\W+){0,2}?(?:is|are|appears?|remains?)\W+(?:\w+\W+)?(?:within (?:the )?(?:normal limits|" \
                 r"limits of normal)|normal\b|unremarkable)"
UNCERTAIN_FIRST = r"\b(?:cannot|can ?not|could not|not)\W+(?:be\W+)?(?:exclude|excluded|rule[ds]? out|ruled out)\b|" \
                  r"\b(?:rule[ds]? out|r/o|to exclude|exclude|differential)\b"
UNCERTAIN = r"\b(?:possible|possibly|probable|probably|likely|may|might|could|questionable|question of|suspicious|" \
            r"suspected|suspect|suggest\w*|concern\w*|worrisome|versus|vs|equivocal|indeterminate|borderline|" \
            r"presumed|presumably|represent\w*|atypical|cannot|consider|considered|or)\b"
UNCERTAIN_AFTER = r"^\W*(?:\w+\W+){0,3}?(?:is|are)?\W*(?:cannot be (?:excluded|ruled out)|not (?:be )?excluded|" \
                  r"(?:is|are) (?:possible|suspected|questioned)|versus|vs)\b"
SENTENCE = r"(?<!\d)[.;!?](?!\d)|\n"
# section headers: the text after the first kind is not labelled, up to the next header or blank line
SKIPPED_SECTION = r"(?:indications?|(?:clinical )?history|clinical (?:indication|information|data)|" \
                  r"reason for (?:exam\w*|study|request)|comparisons?|technique|examination|exam)"
LABELLED_SECTION = r"(?:findings|impressions?|conclusions?|opinion|summary|interpretation|report)"
CLAUSE = r"\b(?:but|however|although|though|except|otherwise|which|whereas|with)\b|,\s*(?=there (?:is|are)\b)|:"

_RX = {c: re.compile(r"\b(?:" + "|".join(p) + r")\b") for c, p in RULES.items()}
_NORMAL_RX = {c: re.compile(r"\b(?:" + "|".join(p) + r")\b") for c, p in NORMAL.items()}
_NOT_MENTION, _PSEUDO, _POST_ONLY = re.compile(NOT_MENTIONS), re.compile(PSEUDO), re.compile(POST_ONLY)
_HYPOTHETICAL = re.compile(HYPOTHETICAL)
_HEADER = re.compile(rf"(?:^|(?<=[.\n]))\s*(?:({SKIPPED_SECTION})|{LABELLED_SECTION})\s*:")
_SECTION_END = re.compile(r"\n\s*\n")
_NEG, _NEG_AFTER = re.compile(NEGATION), re.compile(NEGATION_AFTER)
_UNC_FIRST, _UNC, _UNC_AFTER = re.compile(UNCERTAIN_FIRST), re.compile(UNCERTAIN), re.compile(UNCERTAIN_AFTER)
_SENTENCE, _CLAUSE = re.compile(SENTENCE), re.compile(CLAUSE)


def _blank(rx, s):
    return rx.sub(lambda m: " " * len(m.group()), s)


def labelled_text(text):
    """The text without its skipped sections (SKIPPED_SECTION: from the header to the next header or blank line)."""
    keep, at = [], 0
    for h in _HEADER.finditer(text):
        if h.group(1):
            keep.append(text[at:h.start()])
            nxt, end = _HEADER.search(text, h.end()), _SECTION_END.search(text, h.end())
            at = min(m.start() if m else len(text) for m in (nxt, end))
    return "\n".join(keep + [text[at:]])


def mention_status(clause, m):
    """1 / 0 / -1 for the mention m (a match in clause) from the cues around it; None: not a finding on this image."""
    pre, span, post = clause[:m.start()], m.group(), clause[m.end():]
    hypothetical = [h.end() for h in _HYPOTHETICAL.finditer(pre)]
    negations = [n.end() for n in _NEG.finditer(_blank(_POST_ONLY, pre))]
    if hypothetical and hypothetical[-1] > max(negations, default=-1):  # "history of TB without infection": 0
        return None
    if _UNC_FIRST.search(pre) or _UNC_FIRST.search(post[:40]):
        return -1
    if negations or re.search(r"\b(?:not|no)\b", span) or _NEG_AFTER.search(post):
        return 0
    if _UNC.search(pre) or _UNC_AFTER.search(post):
        return -1
    return 1


def label_reports(texts, observations=OBSERVATIONS):
    """Report texts -> float32 (N, len(observations)): 1 positive, 0 negated, -1 uncertain, NaN not mentioned.
    observations: names from OBSERVATIONS or RULES (default CheXpert's 14, in its order)."""
    unknown = [c for c in observations if c not in RULES and c != "No Finding"]
    if unknown:
        raise ValueError(f"label_reports: unknown observation(s) {unknown}; known: No Finding, {', '.join(RULES)}")
    wanted = [c for c in RULES if c in observations or c in PATHOLOGIES]
    out = np.full((len(texts), len(observations)), np.nan, np.float32)
    for i, text in enumerate(texts):
        found = {}
        for sentence in _SENTENCE.split(labelled_text(text.lower())):
            sentence = _blank(_PSEUDO, _blank(_NOT_MENTION, sentence))
            for clause in _CLAUSE.split(sentence):
                for c in wanted:
                    for m in _RX[c].finditer(clause):
                        found.setdefault(c, set()).add(mention_status(clause, m))
                    if c in _NORMAL_RX and _NORMAL_RX[c].search(clause):
                        found.setdefault(c, set()).add(0)
        found = {c: s - {None} for c, s in found.items() if s - {None}}
        status = {c: 1.0 if 1 in s else -1.0 if -1 in s else 0.0 for c, s in found.items()}
        status["No Finding"] = 0.0 if any(status.get(c, 0.0) != 0.0 for c in PATHOLOGIES) else 1.0
        for j, c in enumerate(observations):
            out[i, j] = status.get(c, np.nan)
    return out
