"""The report labeler on sentences it was not written from (issue 38): which phrases mention a Lung Lesion (CheXpert's
list), what is a question or the past rather than a finding (pneumonia "to evaluate for", the indication section,
"history of"), the ways to say edema is gone, old fractures, and a normal heart as a negative Cardiomegaly mention.
Hand-written sentences, each with the labels it must get (None: not mentioned)."""

import numpy as np
import pytest

import labeler

CASES = [
    # Lung Lesion: CheXpert's mention list (nodule, mass, nodular density / opacity, cavitary lesion, ...)
    ("Nodular opacity in the right upper lobe.", {"Lung Lesion": 1, "Lung Opacity": 1}),
    ("There is a 7 mm nodular density at the left lung base.", {"Lung Lesion": 1}),
    ("Stable right upper lobe nodule.", {"Lung Lesion": 1, "Nodule": 1}),  # stable = still there
    ("Calcified nodule in the right upper lobe, likely a granuloma.", {"Lung Lesion": 1, "Nodule": 1}),
    ("Right apical cavitary lesion.", {"Lung Lesion": 1}),
    ("Large right hilar mass.", {"Lung Lesion": 1}),
    ("No nodules or masses.", {"Lung Lesion": 0, "Nodule": 0}),
    ("No suspicious pulmonary nodules are identified.", {"Lung Lesion": 0, "Nodule": 0}),
    ("The previously seen nodule is no longer seen.", {"Lung Lesion": 0}),
    # ... and what is not one: a granuloma, "nodular" in other senses, a mass outside the lung, a bone lesion,
    # cancer elsewhere, a lucency that could be a cavity, a search for nodules
    ("Calcified granuloma in the right upper lobe.", {"Lung Lesion": None, "Nodule": None, "Granuloma": 1}),
    ("Coarse nodular interstitial opacities at both bases.", {"Lung Lesion": None, "Nodule": None, "Lung Opacity": 1}),
    ("Mild nodular prominence of the right hilum.", {"Lung Lesion": None, "Nodule": None}),
    ("It is more nodular in appearance on this examination.", {"Lung Lesion": None}),
    ("Differential includes a pericardial mass or a pleural mass.", {"Lung Lesion": None}),
    ("Widened mediastinum, possibly a mediastinal mass.", {"Lung Lesion": None, "Enlarged Cardiomediastinum": 1}),
    ("Expansile lesion of the left 5th rib.", {"Lung Lesion": None}),
    ("Metastatic breast cancer to the spine.", {"Lung Lesion": None}),
    ("Possible apical cavitation.", {"Lung Lesion": None}),
    ("Evaluation for lung nodules is desired, consider CT.", {"Lung Lesion": None, "Nodule": None}),
    ("CT is more sensitive in detecting small nodules.", {"Lung Lesion": None, "Nodule": None}),
    # Pneumonia: uncertain, a question, not the indication
    ("Right lower lobe pneumonia.", {"Pneumonia": 1}),
    ("No pneumonia.", {"Pneumonia": 0}),
    ("Cannot exclude pneumonia.", {"Pneumonia": -1}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": -1}),
    ("Consider pneumonia in the appropriate clinical setting.", {"Pneumonia": -1}),
    ("Right lower lobe opacity, to evaluate for pneumonia.", {"Pneumonia": None, "Lung Opacity": 1}),
    ("Evaluate for pneumonia.", {"Pneumonia": None}),
    ("Please correlate clinically for pneumonia.", {"Pneumonia": None}),
    ("It is unclear whether this represents atelectasis or pneumonia.", {"Pneumonia": -1, "Atelectasis": -1}),
    ("Calcified sequelae of prior granulomatous infection.", {"Pneumonia": None, "Granuloma": 1, "No Finding": 1}),
    ("INDICATION: Fever, cough. Rule out pneumonia. FINDINGS: The lungs are clear.", {"Pneumonia": None}),
    ("Indication: pneumonia. Impression: No acute disease.", {"Pneumonia": None, "No Finding": 1}),
    ("CLINICAL HISTORY: pneumonia\n\nRight lower lobe pneumonia.", {"Pneumonia": 1}),  # a blank line ends it
    # Edema: the ways to say there is none, and what is still edema
    ("No evidence of pulmonary edema.", {"Edema": 0}),
    ("The lungs are clear without edema.", {"Edema": 0}),
    ("Pulmonary edema has resolved.", {"Edema": 0}),
    ("Pulmonary edema has cleared.", {"Edema": 0}),
    ("Pulmonary edema is no longer present.", {"Edema": 0}),
    ("Interval resolution of pulmonary edema.", {"Edema": 0}),
    ("History of congestive heart failure.", {"Edema": None}),
    ("Known history of tuberculosis without active infection.", {"Pneumonia": 0}),
    ("No effusion, to evaluate for pneumonia.", {"Pneumonia": None, "Pleural Effusion": 0}),
    ("Mild pulmonary edema.", {"Edema": 1}),
    ("Resolving pulmonary edema.", {"Edema": 1}),  # less of it is still some
    # Fracture: old / healed fractures are fractures (CheXpert, NegBio and IU's MeSH coders); a question is not one
    ("Old healed left rib fractures.", {"Fracture": 1}),
    ("Chronic left 6th rib fracture.", {"Fracture": 1}),
    ("No acute fracture. Old healed right clavicle fracture.", {"Fracture": 1}),
    ("No acute displaced rib fracture.", {"Fracture": 0}),
    ("Axillary densities not seen on the previous exam, healed right rib fracture noted.", {"Fracture": 1}),
    ("If there is concern for occult fracture, consider a dedicated rib series.", {"Fracture": None}),
    # Cardiomegaly: a normal heart is a negative mention
    ("Heart size is normal.", {"Cardiomegaly": 0}),
    ("Normal heart size.", {"Cardiomegaly": 0}),
    ("The heart is normal in size.", {"Cardiomegaly": 0}),
    ("The heart size and pulmonary vascularity appear within normal limits.", {"Cardiomegaly": 0}),
    ("The heart, pulmonary XXXX and mediastinum are within normal limits.",
     {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("The cardiomediastinal silhouette is normal.", {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("Cardiomediastinal silhouette is within normal limits.", {"Cardiomegaly": 0, "Enlarged Cardiomediastinum": 0}),
    ("Normal size and configuration of the cardiac silhouette.", {"Cardiomegaly": 0}),
    ("Heart size is at the upper limits of normal.", {"Cardiomegaly": None}),  # borderline, not normal
    ("Heart size is stable.", {"Cardiomegaly": None}),
    ("The heart is enlarged and the lungs are normal.", {"Cardiomegaly": 1}),
    ("Considerable enlargement of the cardiac silhouette.", {"Cardiomegaly": 1}),
    ("Cardiac pacing leads in normal position.", {"Cardiomegaly": None, "Support Devices": 1}),
    # a negation that follows what it negates does not negate what follows it
    ("The catheter is no longer seen, small right apical pneumothorax.", {"Support Devices": 0, "Pneumothorax": 1}),
]


@pytest.mark.parametrize("text,want", CASES, ids=[t[:60] for t, _ in CASES])
def test_label(text, want):
    y = labeler.label_reports([text], list(want))[0]
    got = {c: None if np.isnan(v) else int(v) for c, v in zip(want, y)}
    assert got == want, text


def test_indication_section_ends_at_the_next_header():
    text = ("EXAMINATION: Chest PA and lateral.\nINDICATION: Edema?\nFINDINGS: Small left effusion.\n"
            "IMPRESSION: Effusion.")
    assert labeler.labelled_text(text.lower()).split() == ["findings:", "small", "left", "effusion.", "impression:",
                                                          "effusion."]
    assert labeler.labelled_text("no header. pneumonia.").strip() == "no header. pneumonia."
