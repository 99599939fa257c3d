"""
The phantom: a generated, chest-X-ray-like data set with known ground truth.

    import phantom
    d = phantom.generate(2000, image_size=64, seed=0)
    d["images"]  # (N, H, W) uint8      d["labels"]  # (N, 10) float32 in {0, 1}, columns = phantom.CLASSES
    d["records"] # per image: patient_id, study_id, view, age, sex, text (report), indication

    python phantom.py --n_images=4000 --image_size=128   # speed on one core + a PNG grid of examples
    python data.py --dataset=phantom                     # the real entry point: prepare data/phantom

Anatomy (frontal view, radiological convention: the patient's right is on the image left), drawn
in a canonical frame that each image rotates (+-8 deg), scales (0.76-1.1) and shifts (+-13% x,
+-9% y): body outline, two lungs with vessel-like markings (ridged noise), heart, mediastinum and
spine, posterior ribs, clavicles, two diaphragm domes (the right one higher) and a gastric bubble
under the left dome. Sizes are in canonical units, so everything scales with image_size.

Findings, drawn so that a radiologist recognises the idea:
  Cardiomegaly      wider heart: cardiothoracic ratio ~0.52-0.72 instead of ~0.38-0.54
  Pleural Effusion  white fluid at a lung base with a meniscus rising laterally, blunting the
                    costophrenic angle; right, left or both; small / moderate / large
  Pneumothorax      the lung edge pulled away from the chest wall (apex and side): a rim of air
                    without markings and a bright pleural line
  Consolidation     dense patch with air bronchograms (the bronchi stay dark inside it)
  Lung Opacity      larger, fainter, soft-edged haze; a third of them bilateral
  Nodule            a round dense spot, ~9-10 px across at 64 px (smaller is not learnable there)
  Edema             bilateral perihilar haze over thickened interstitium + Kerley B lines
  Atelectasis       a plate-like band at a base; half of them with volume loss (raised hemidiaphragm)
  Support Devices   endotracheal tube, nasogastric tube, central venous catheter, pacemaker + lead
  No Finding        1 exactly when none of the eight pathologies is present. Support Devices do
                    not count (CheXpert's convention): "No Finding" and "Support Devices" can both be 1.

Clinical model: patients have 1-5 studies (mean ~2.5); age (18-95) and sex are per patient;
cardiomegaly, nodules (same place) and pacemakers are chronic and persist across a patient's
studies. A hidden inpatient/ICU state per study makes AP views, lines and tubes, edema, effusion,
consolidation and atelectasis likelier; edema follows cardiomegaly, effusion follows edema,
opacity follows consolidation and edema, atelectasis follows effusion; older patients get more
cardiomegaly, edema and nodules, young men more pneumothorax. AP views magnify the heart 6%.
The indication comes from a finding half of the time ("Fever and cough." with consolidation,
"Line placement." with lines, "Routine pre-operative." for normals) and from a generic pool
otherwise. Reports: one sentence per finding (varied wording, severity, laterality), then
explicit negatives ("No pneumothorax."). Every positive sentence holds one of KEYWORDS[class]
and every negative sentence starts with "No ", so label_report() recovers the labels exactly.

Calibration (the issue's bar: the phantom must need a CNN). Pose, contrast (x0.55-1.25 about
mid-grey), brightness, a gamma-like bend, a smooth shading field and noise vary per image, so
position and global intensity say little (what a linear model uses), while local shapes stay
(what a CNN learns). Measured at 64 px, seed 0:
  logistic regression per class on standardised 16x16 thumbnails, 6000 train / 2000 val:
      macro AUC 0.777 (cardiomegaly 0.85, effusion 0.85, edema 0.84, devices 0.90, nodule 0.72, consolidation 0.65)
  the quick start (python train.py: convnext_atto, 800 steps, batch 64, AdamW 8e-3, no augmentation,
      12000 images): val macro AUC 0.920 in 4 min 21 s on 2 cores (0.913 in another run) (nodule 0.81 is the weakest class, No Finding 0.98).
  The issue asks <= 0.80 and >= 0.90: both hold.
A known disparity (issue 36): generate(..., disparity="sex=F:0.4") draws every finding of one subgroup (sex=F|M,
age>=N or age<N, view=AP|PA) at 40% of its contrast (and a cardiomegaly at 40% of its enlargement), so that a model
is expected to do worse there; evaluate.py --subgroups must find that gap (docs/subgroups.md). The reports follow
the images (a subtler heart may read "mild"). Off ("") by default: no random number is drawn for it, so the images
are bit-identical to those made without the knob.
Speed, one core of a busy 2-core VM, per CPU-second: ~1500-1800 img/s at 128 px, ~3000-3600 at
64 px (target 2000 at 128 px); text is ~25 us per image.
"""

import argparse
import random
import re
import time

import numpy as np

import configurator
import labeler

CLASSES = ["Cardiomegaly", "Pleural Effusion", "Pneumothorax", "Consolidation", "Lung Opacity",
           "Nodule", "Edema", "Atelectasis", "Support Devices", "No Finding"]
PATHOLOGIES = CLASSES[:8]  # the findings that make "No Finding" 0 (Support Devices do not)
CM, EFF, PTX, CONS, OPAC, NOD, EDEMA, ATEL, DEV, NOFIND = range(10)

# a sentence names class c iff it contains one of KEYWORDS[c] (lower case); negatives start with "No "
KEYWORDS = {
    "Cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "Pleural Effusion": ("effusion",),
    "Pneumothorax": ("pneumothorax",),
    "Consolidation": ("consolidation",),
    "Lung Opacity": ("opacity", "opacities"),
    "Nodule": ("nodule",),
    "Edema": ("edema",),
    "Atelectasis": ("atelectasis",),
    "Support Devices": ("tube", "catheter", "pacemaker"),
}

# -----------------------------------------------------------------------------
# the clinical model: patients -> studies -> labels, view, indication


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _sample_cohort(n, rng):
    """Per-study clinical variables and labels (arrays of length n), patients with 1-5 studies."""
    k = rng.choice(5, size=n, p=[0.30, 0.25, 0.20, 0.14, 0.11]) + 1  # studies per patient, mean ~2.5
    n_pat = int(np.searchsorted(np.cumsum(k), n)) + 1
    k = k[:n_pat]
    k[-1] -= k.sum() - n  # the last patient keeps only the studies that fit
    pat = np.repeat(np.arange(n_pat), k)  # patient of each study
    visit = np.arange(n) - np.repeat(np.cumsum(k) - k, k)  # 0, 1, 2.. within the patient
    # patient level: age, sex, chronic findings (persist across studies)
    age0 = 18 + 77 * rng.beta(2.4, 1.8, n_pat)
    male = rng.random(n_pat) < 0.55
    z = (age0 - 60) / 15
    cm = rng.random(n_pat) < _sigmoid(-1.9 + 0.9 * z + 0.3 * male)
    nod = rng.random(n_pat) < _sigmoid(-2.2 + 0.5 * z)
    pm = rng.random(n_pat) < _sigmoid(-3.6 + 1.8 * cm + 0.5 * z)  # pacemaker
    age = np.minimum(age0[pat] + visit // 2, 95).astype(np.int64)
    male, z, cm, nod, pm = male[pat], z[pat], cm[pat], nod[pat], pm[pat]
    # study level: hidden inpatient/ICU state, then findings with realistic dependencies
    u = rng.random((n, 9))
    icu = u[:, 0] < _sigmoid(-1.3 + 0.3 * z + 0.6 * cm)
    edema = u[:, 1] < _sigmoid(-3.0 + 1.9 * cm + 1.2 * icu + 0.3 * z)
    eff = u[:, 2] < _sigmoid(-2.6 + 1.7 * edema + 0.6 * cm + 0.8 * icu + 0.2 * z)
    cons = u[:, 3] < _sigmoid(-2.5 + 1.1 * icu)
    opac = u[:, 4] < _sigmoid(-2.4 + 1.8 * cons + 1.2 * edema + 0.4 * icu)
    atel = u[:, 5] < _sigmoid(-2.6 + 1.2 * eff + 0.9 * icu + 0.3 * z)
    lines = u[:, 6] < np.where(icu, 0.7, 0.03)  # ET / NG tubes, central lines
    ptx = u[:, 7] < _sigmoid(-2.7 + 1.3 * (male & (age < 40)) + 0.7 * icu + 0.6 * lines)
    ap = u[:, 8] < _sigmoid(-1.6 + 2.6 * icu + 1.0 * lines)
    labels = np.stack([cm, eff, ptx, cons, opac, nod, edema, atel, lines | pm], 1).astype(np.float32)
    no_finding = labels[:, :8].max(1) == 0
    labels = np.concatenate([labels, no_finding[:, None].astype(np.float32)], 1)
    return dict(pat=pat, visit=visit, age=age, male=male, ap=ap, icu=icu, lines=lines, pm=pm, labels=labels)


# -----------------------------------------------------------------------------
# image parameters: pose, anatomy variants, and the geometry of each finding (canonical units:
# the image spans [-1, 1] in both directions before the per-image pose)


def _sample_params(c, rng):
    n = len(c["pat"])
    L = c["labels"] > 0
    U = lambda lo, hi, size=n: rng.uniform(lo, hi, size)  # noqa: E731
    side = lambda: np.where(rng.random(n) < 0.5, -1.0, 1.0)  # noqa: E731  -1 = patient right (image left)
    p = dict(
        rot=np.deg2rad(U(-8, 8)), scale=U(0.76, 1.1), tx=U(-0.26, 0.26), ty=U(-0.18, 0.18),
        lw=U(0.92, 1.06), lh=U(0.9, 1.05), dome=U(0.36, 0.46), bubble=rng.random(n) < 0.7,
        rib_phase=U(0, 1), tex=rng.integers(0, 1 << 30, (n, 3)),
        # tone: the per-image window that makes global intensity uninformative
        bend=U(-0.7, 0.7), contrast=U(0.55, 1.25), bright=U(-0.12, 0.12),
        field=U(0.02, 0.08),  # amplitude of a smooth random shading field (patient thickness, heel effect)
    )
    # cardiomegaly: heart half-width factor (chronic: the same patient keeps the same heart)
    heart_pat = U(1.17, 1.45, c["pat"].max() + 1)
    p["heart"] = np.where(L[:, CM], heart_pat[c["pat"]], U(0.86, 1.1)) * np.where(c["ap"], 1.06, 1.0)
    # effusion: side 1 right, 2 left, 3 both; height of the fluid above the costophrenic angle
    p["eff_side"] = np.where(L[:, EFF], rng.choice([1, 2, 3], n, p=[0.35, 0.3, 0.35]), 0)
    p["eff_h"] = 0.13 + 0.35 * rng.random((n, 2)) ** 1.5  # small effusions are the common ones
    # pneumothorax: side and depth of the rim of air (3-10% of the image width)
    p["ptx_side"], p["ptx_d"] = side(), U(0.12, 0.22)
    # consolidation / opacity / nodule / atelectasis: side, position in the lung, size
    p["cons_side"], p["cons_v"], p["cons_a"], p["cons_b"] = side(), U(-0.35, 0.3), U(0.13, 0.21), U(0.14, 0.24)
    p["opac_side"], p["opac_v"], p["opac_a"], p["opac_dens"] = side(), U(-0.4, 0.25, (n, 2)), U(0.14, 0.24), U(0.45, 0.65)
    p["opac_two"] = rng.random(n) < 0.35
    q = rng.uniform(-1, 1, (c["pat"].max() + 1, 4))[c["pat"]]  # a chronic nodule: same place and size
    p["nod_side"], p["nod_u"] = np.sign(q[:, 0] + 1e-9), 0.6 * q[:, 1]
    p["nod_v"], p["nod_r"] = 0.35 * q[:, 2] - 0.15, 0.14 + 0.02 * q[:, 3]  # radius ~4.5-5 px at 64 px
    p["edema"] = U(0.3, 0.6)
    p["atel_side"], p["atel_v"], p["atel_ang"], p["atel_len"] = side(), U(0.05, 0.25), U(-0.5, 0.3), U(0.14, 0.24)
    p["atel_lift"] = np.where(rng.random(n) < 0.5, U(0.07, 0.13), 0.0)  # volume loss: elevated hemidiaphragm
    p["dome_r"] = p["dome"] - np.where(L[:, ATEL] & (p["atel_side"] < 0), p["atel_lift"], 0)
    p["dome_l"] = p["dome"] + 0.04 - np.where(L[:, ATEL] & (p["atel_side"] > 0), p["atel_lift"], 0)
    # devices: bit 0 ET tube, 1 NG tube, 2 central venous catheter, 3 pacemaker
    lines = c["lines"]
    dev = (lines & (rng.random(n) < 0.6)) * 1 + (lines & (rng.random(n) < 0.5)) * 2 + (lines & (rng.random(n) < 0.6)) * 4
    dev = np.where(lines & (dev == 0), 4, dev) + c["pm"] * 8
    p["dev"], p["cvc_side"], p["dev_v"] = dev, side(), U(-0.5, -0.3)
    p["pm_u"], p["pm_v"] = np.where(rng.random(n) < 0.8, 1, -1) * U(0.4, 0.6), U(-0.72, -0.5)  # pacemaker pocket
    return p


# -----------------------------------------------------------------------------
# rendering. Speed (target: 2000 img/s at 128 px on one core) comes from two rules: the whole-image
# anatomy is computed in place in preallocated (chunk, S, S) buffers (a fresh temporary of that
# size page-faults on every call, which costs more than the arithmetic), and each finding is
# drawn only inside its own bounding box, image by image.

CHUNK_PIXELS = 1 << 17  # pixels per chunk (8 images at 128 px): amortises Python, buffers stay in L2/L3


class _Grid:
    """The pose of images i0:i1: canonical coordinates of their pixels, boxes of canonical regions.

    U = ca (x - tx) + sa (y - ty), V = ca (y - ty) - sa (x - tx) (ca, sa = cos, sin of rot / scale) is a
    row term plus a column term, so any a U + b V + c costs one broadcast add over the image."""

    def __init__(self, p, i0, i1, S):
        rot, sc, tx, ty = (p[k][i0:i1, None] for k in ("rot", "scale", "tx", "ty"))
        x = (np.arange(S) + 0.5) / S * 2 - 1  # pixel centres in [-1, 1]
        ca, sa = np.cos(rot) / sc, np.sin(rot) / sc
        terms = (ca * (x - tx), sa * (x - ty), -sa * (x - tx), ca * (x - ty))  # (n, S): columns, rows
        self.Ux, self.Uy, self.Vx, self.Vy = (t.astype(np.float32) for t in terms)
        self.S = S
        self.pose = list(zip(*(a[:, 0].tolist() for a in (sc, np.cos(rot), np.sin(rot), tx, ty))))

    def lin(self, a, b, c, out, rs=slice(None), cs=slice(None)):
        """out[:, rs, cs] = a U + b V + c (a, b, c: Python numbers or one value per image)."""
        a, b, c = (t if isinstance(t, float) else t.astype(np.float32)[:, None] for t in (a, b, c))
        if isinstance(b, float) and b == 0.0:
            row, col = a * self.Ux[:, cs], a * self.Uy[:, rs] + c
        elif isinstance(a, float) and a == 0.0:
            row, col = b * self.Vx[:, cs], b * self.Vy[:, rs] + c
        else:
            row, col = a * self.Ux[:, cs] + b * self.Vx[:, cs], a * self.Uy[:, rs] + b * self.Vy[:, rs] + c
        return np.add(row[:, None, :], col[:, :, None], out=out[:, rs, cs])

    def box(self, u0, u1, v0, v1, j=None):
        """(rows, cols) slices covering the canonical box [u0, u1] x [v0, v1] in image j (None: all images)."""
        xs, ys = [], []
        for sc, c, s, tx, ty in self.pose if j is None else self.pose[j:j + 1]:
            for u, v in ((u0, v0), (u0, v1), (u1, v0), (u1, v1)):
                xs.append(sc * (c * u - s * v) + tx)
                ys.append(sc * (s * u + c * v) + ty)
        h, S = self.S / 2, self.S
        return (slice(max(0, int((min(ys) + 1) * h)), min(S, int((max(ys) + 1) * h) + 1)),
                slice(max(0, int((min(xs) + 1) * h)), min(S, int((max(xs) + 1) * h) + 1)))

    def patch(self, j, rs, cs):
        """Canonical (u, v) of the pixels [rs, cs] of image j, (h, w) arrays."""
        return (self.Ux[j, None, cs] + self.Uy[j, rs, None], self.Vx[j, None, cs] + self.Vy[j, rs, None])


def _clip01(x, k, b):
    """x = clip(k x + b, 0, 1) in place: the soft edge of every shape."""
    x *= k
    x += b
    return np.clip(x, 0.0, 1.0, out=x)


def _ellipse(u, v, cx, cy, a, b, k):
    """Soft ellipse on a patch: 1 inside, 0 outside, an edge of width 1/k in r^2."""
    r2 = ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2
    return _clip01(r2, -k, k)


def _band(d, w):
    """1 where |d| < w, fading to 0 at 2w: lines, tubes, plates."""
    return _clip01(np.abs(d), -1.0 / w, 2.0)


def _banks(S, seed):
    """Textures that each image crops at its own random offset: lung markings (ridged band-pass noise,
    a vessel-like network, ~9 cycles per image), white noise, and a smooth shading field (~2 cycles)."""
    rng = np.random.default_rng([seed, S, 7])
    f = np.fft.fftfreq(2 * S) * 2 * S  # cycles per image width
    r = np.hypot(f[:, None], f[None, :])
    bp = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((2 * S, 2 * S))) * np.exp(-((r - 9) / 4) ** 2)))
    ridge = np.clip(1 - np.abs(bp) / bp.std(), 0, 1) ** 2
    low = np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((2 * S, 2 * S))) * np.exp(-(r / 2.0) ** 2) * (r > 0)))
    noise = rng.standard_normal((4 * max(S, CHUNK_PIXELS // S), S)) * 0.03 * 255  # quantum noise, 3% of full scale
    return [a.astype(np.float32) for a in (ridge, 1 - 0.3 * ridge, noise, low / low.std())]


class _Row:
    """g["key"] -> p["key"][i] as Python numbers (numpy scalars are slow in scalar arithmetic)."""

    def __init__(self, p, i):
        self.p, self.i = p, i

    def __getitem__(self, k):
        return self.p[k][self.i].tolist()


def _render(p, L, i0, i1, banks, ws):
    """Images i0:i1 as uint8 (n, S, S). Shapes are soft ramps clip(k (1 - r^2)); the sharpness k is
    folded into the coordinates (sqrt(k) U) so that a ramp costs one subtraction and one clip."""
    ridge_bank, mark_bank, noise_bank, field_bank = banks
    n, S = i1 - i0, ws["AU"].shape[-1]
    g = lambda k: p[k][i0:i1]  # noqa: E731
    col = lambda a: np.asarray(a, np.float32).reshape(-1, 1, 1)  # noqa: E731  one value per image
    AU, air, dens, t1, t2 = (ws[k][:n] for k in ("AU", "air", "dens", "t1", "t2"))
    G = _Grid(p, i0, i1, S)
    np.abs(G.lin(1.0, 0.0, 0.0, AU), out=AU)  # |U| folds the two lungs (and the two domes) onto one shape
    # lungs: rounded apex, vertical walls below the centre (V > -0.12), edge sharpness 8
    lw, lh, dr, dl = g("lw"), g("lh"), g("dome_r"), g("dome_l")
    np.subtract(AU, col(0.36 * lw), out=t1)
    np.multiply(t1, t1, out=t2)  # squared offset from the lung axis, shared with the dome
    np.multiply(t2, col(8 / (0.26 * lw) ** 2), out=air)
    # dome: air only above V = d + tilt U + 1.3 (|U| - 0.36 lw)^2, the right (U < 0) dome higher
    np.multiply(t2, 1.3 * 25, out=t1)
    t1 += G.lin(25 * (dl - dr) / 0.72, -25.0, 25 * (dl + dr) / 2, t2)
    np.clip(t1, 0, 1, out=t1)
    k = 8 ** 0.5 / (0.6 * lh)
    np.minimum(G.lin(0.0, k, 0.12 * k, t2), 0, out=t2)
    t2 *= t2
    air += t2
    np.subtract(8.0, air, out=air)
    np.clip(air, 0, 1, out=air)
    air *= t1
    # heart: soft tissue in front of the lungs, growing to the patient's left; air *= 1 - heart
    hw = g("heart")
    a, b, cx = 0.29 * hw / 5 ** 0.5, (0.27 + 0.04 * (hw - 1)) / 5 ** 0.5, 0.07 + 0.12 * (hw - 1)
    G.lin(1 / a, 0.0, -cx / a, t1)
    t1 *= t1
    G.lin(0.0, 1 / b, -0.3 / b, t2)
    t2 *= t2
    t1 += t2
    t1 -= 4.0
    air *= np.clip(t1, 0, 1, out=t1)
    # posterior ribs: arcs rising from the spine and falling laterally, V - |U| (0.6 |U| - 0.18) = const,
    # 5.6 per unit height; bright bands of 0.13 seen over the lungs
    f = 5.6 / lh
    G.lin(0.0, f, g("rib_phase"), t2)
    np.multiply(AU, col(0.6 * f), out=t1)
    t1 -= col(0.18 * f)
    t1 *= AU
    t2 -= t1
    np.rint(t2, out=t1)
    t2 -= t1
    np.abs(t2, out=t2)
    t2 *= -0.78
    t2 += 0.1716  # 0.13 clip(6 (0.22 - |d|), 0, 1)
    np.clip(t2, 0, 0.13, out=t2)
    np.multiply(t2, air, out=dens)
    # small structures, in place inside the box that covers them in every image of the chunk
    rs, cs = G.box(-0.12, 0.12, -1.2, 1.2)  # spine: 0.07 clip(2 - |U| / 0.045)
    t = np.multiply(AU[:, rs, cs], -0.07 / 0.045, out=t1[:, rs, cs])
    t += 0.14
    dens[:, rs, cs] += np.clip(t, 0, 0.07, out=t)
    rs, cs = G.box(-0.62, 0.62, -0.82, -0.52)  # clavicles: |V + 0.7 - 0.22 (|U| - 0.1)| < 0.022, |U| < 0.58
    t = np.multiply(AU[:, rs, cs], -0.22, out=t1[:, rs, cs])
    t += G.lin(0.0, 1.0, 0.722, t2, rs, cs)
    np.abs(t, out=t)
    _clip01(t, -1 / 0.022, 2.0)
    t *= AU[:, rs, cs] < 0.58
    t *= 0.12
    dens[:, rs, cs] += t
    rs, cs = G.box(0.15, 0.45, 0.35, 0.85)  # gastric bubble under the left dome
    r2 = G.lin(1 / 0.1, 0.0, -3.0, t1, rs, cs) ** 2 + G.lin(0.0, 1 / 0.07, -(dl + 0.16) / 0.07, t2, rs, cs) ** 2
    bub = _clip01(r2, -4.0, 4.0)
    dens[:, rs, cs] -= bub * col(0.18 * g("bubble"))
    has = L[i0:i1] > 0
    tex = g("tex") % (S + 1)
    for j in range(n):
        oy, ox, oz = tex[j].tolist()
        air[j] *= mark_bank[oy:oy + S, ox:ox + S]  # lung markings
        if has[j, :DEV].any() or p["dev"][i0 + j]:
            s = p["finding_strength"][i0 + j] if "finding_strength" in p else 1.0
            before = (air[j].copy(), dens[j].copy()) if s < 1 else None
            _draw_findings(G, j, _Row(p, i0 + j), has[j], air[j], dens[j], ridge_bank[oz:oz + S, ox:ox + S])
            if before is not None:  # a known disparity: keep only a fraction s of what the findings changed
                for buf, b in zip((air[j], dens[j]), before):
                    buf -= b
                    buf *= s
                    buf += b
    # compose: (soft tissue - lung air + bone/metal) x body outline, in grey levels, plus noise and shading
    k = (6 * 255) ** 0.5
    G.lin(k / 0.93, 0.0, 0.0, t1)
    t1 *= t1
    G.lin(0.0, k / 1.35, -0.25 * k / 1.35, t2)
    t2 *= t2
    t1 += t2
    np.subtract(6 * 255, t1, out=t1)
    np.clip(t1, 0, 255, out=t1)  # the body, 255 inside
    air *= -0.44
    air += 0.62
    air += dens
    air *= t1
    # shading (per image) and quantum noise (one slab of the noise bank for the whole chunk)
    for j in range(n):
        oy, ox, oz = tex[j].tolist()
        air[j] += np.multiply(field_bank[ox:ox + S, oz:oz + S], 255 * p["field"][i0 + j], out=t2[j])
    o = int(g("tex")[0, 0] % (len(noise_bank) - n * S + 1))
    air += noise_bank[o:o + n * S].reshape(n, S, S)
    # tone: a per-image window: gamma-like bend x + kappa x (1 - x), then contrast about mid-grey, brightness
    np.subtract(255.0, air, out=t2)
    t2 *= air
    t2 *= col(g("bend") / 255)
    air += t2
    air *= col(g("contrast"))
    air += col(255 * (0.5 - 0.5 * g("contrast") + g("bright")) + 0.5)
    np.clip(air, 0, 255, out=air)
    q = np.empty((n, S, S), np.uint8)
    np.copyto(q, air, casting="unsafe")
    return q


def _draw_findings(G, j, g, has, air, dens, ridge):
    """Draw the findings of image j of the chunk in place (g: its parameters), each inside its own box."""
    def view(u0, u1, v0, v1):
        rs, cs = G.box(u0, u1, v0, v1, j)
        return (*G.patch(j, rs, cs), air[rs, cs], dens[rs, cs], ridge[rs, cs])

    lw, lh = g["lw"], g["lh"]
    if has[EFF]:  # fluid at the base, blunting the costophrenic angle, meniscus rising towards the chest wall
        for sd, h in ((-1, g["eff_h"][0] * (g["eff_side"] != 2)), (1, g["eff_h"][1] * (g["eff_side"] != 1))):
            if h > 0:
                base = (g["dome_r"] if sd < 0 else g["dome_l"]) + 0.09  # the dome at the costophrenic angle
                u, v, a, _, _ = view(sd * 0.36 * lw - 0.3, sd * 0.36 * lw + 0.3, base - 1.5 * h - 0.1, base + 0.05)
                lat = np.clip((np.abs(u) - 0.3 * lw) * (1 / 0.3), 0, 1)
                a *= 1 - 0.95 * _clip01(v - (base - h) + 0.5 * h * lat * lat, 25.0, 0.0)
    if has[PTX]:  # the lung edge pulled down and in: a rim of air without markings, a pleural line
        sd, d = g["ptx_side"], g["ptx_d"]
        cx, a0, b0 = 0.36 * lw * sd, 0.26 * lw, 0.6 * lh
        u, v, a, de, _ = view(cx - 0.3, cx + 0.3, -0.8, 0.55)
        r2 = ((u - (cx - 0.6 * d * sd)) / (a0 - 0.6 * d)) ** 2 + (np.minimum(v - (-0.12 + 0.9 * d), 0) / (b0 - 0.9 * d)) ** 2
        lung = _clip01(a / max(float(a.max()), 1e-3), 3.0, 0.0)  # the lung as drawn so far
        rim = _clip01(r2 - 1, 12.0, 0.0) * lung
        a += rim * (1.1 * lung - a)  # plain air: no markings, no lung tissue
        de += 0.7 * _band(r2 - 1, 0.12) * lung
    if has[CONS]:  # dense patch; the bronchi (the ridge network) stay dark inside it: air bronchograms
        cx, cy, ra, rb = 0.38 * g["cons_side"], g["cons_v"], g["cons_a"], g["cons_b"]
        u, v, a, _, r = view(cx - ra - 0.05, cx + ra + 0.05, cy - rb - 0.05, cy + rb + 0.05)
        a *= 1 - 0.9 * _ellipse(u, v, cx, cy, ra, rb, 3) * (1 - 0.9 * r)
    if has[OPAC]:  # hazy, soft-edged; a second patch in the other lung for a third of them
        ra = g["opac_a"]
        for k, sd in enumerate((g["opac_side"], -g["opac_side"])[:1 + int(g["opac_two"])]):
            cx, cy = 0.36 * sd, g["opac_v"][k]
            u, v, a, _, _ = view(cx - 1.3 * ra, cx + 1.3 * ra, cy - 1.5 * ra, cy + 1.5 * ra)
            a *= 1 - g["opac_dens"] * _ellipse(u, v, cx, cy, ra, 1.2 * ra, 1.5)
    if has[NOD]:
        cx, cy, r = g["nod_side"] * (0.36 + 0.17 * g["nod_u"]), g["nod_v"], g["nod_r"]
        u, v, a, de, _ = view(cx - r - 0.05, cx + r + 0.05, cy - r - 0.05, cy + r + 0.05)
        m = _ellipse(u, v, cx, cy, r, r, 3)
        de += 0.75 * m
        a *= 1 - 0.95 * m
    if has[EDEMA]:  # bilateral perihilar haze over thickened interstitium + Kerley B lines at the lateral bases
        u, v, a, _, r = view(-0.7, 0.7, -0.45, 0.6)
        au = np.abs(u)
        haze = _ellipse(au, v, 0.2, 0.0, 0.24, 0.3, 1.2) * (0.25 + 0.75 * r)
        kerley = _band(v * 9 - np.rint(v * 9), 0.2) * _clip01(au - 0.42, 12.0, 0.0) * (v > 0.0)
        a *= 1 - g["edema"] * np.maximum(haze, 1.6 * kerley)
    if has[ATEL]:  # plate-like band at a base
        cx, cy, ln = g["atel_side"] * 0.36, g["atel_v"], g["atel_len"]
        ang = g["atel_ang"] * g["atel_side"]
        u, v, a, de, _ = view(cx - ln - 0.1, cx + ln + 0.1, cy - ln - 0.1, cy + ln + 0.1)
        along = (u - cx) * np.cos(ang) + (v - cy) * np.sin(ang)
        across = (v - cy) * np.cos(ang) - (u - cx) * np.sin(ang)
        band = _band(across, 0.05) * _clip01(np.abs(along), -20.0, 20 * ln)
        a *= 1 - 0.95 * band
        de += 0.12 * band
    dev = int(g["dev"])
    w = 0.04  # tube half-width: ~1.3 px at 64 px, scales with the image
    if dev & 1:  # endotracheal tube down the trachea
        u, v, _, de, _ = view(-0.08, 0.08, -1.3, g["dev_v"])
        de += 0.9 * _band(u, w)
    if dev & 2:  # nasogastric tube down the oesophagus, then left into the stomach
        u, v, _, de, _ = view(-0.06, 0.12, -1.3, 0.45)
        de += 0.9 * _band(u - 0.03, w)
        u, v, _, de, _ = view(0.0, 0.3, 0.42, 0.65)
        de += 0.9 * _band(u - 0.03 - 1.2 * (v - 0.45), 1.5 * w) * (v > 0.45)
    if dev & 4:  # central venous catheter from the subclavian vein to the superior vena cava
        sd = g["cvc_side"]
        u, v, _, de, _ = view(min(0.0, sd * 0.75), max(0.0, sd * 0.75), -0.75, -0.02)
        de += 0.9 * _band(u - sd * (0.07 + 2.0 * (v + 0.05) ** 2), w) * (v > -0.72) * (v < -0.05)
    if dev & 8:  # pacemaker box in the upper chest, lead to the right ventricle at (0.05, 0.2)
        pu, pv = g["pm_u"], g["pm_v"]
        u, v, _, de, _ = view(pu - 0.16, pu + 0.16, pv - 0.11, pv + 0.11)
        de += 0.9 * _band(u - pu, 0.07) * _band(v - pv, 0.045)  # a rectangular can, unlike a nodule
        u, v, _, de, _ = view(min(pu, 0.05) - 0.05, max(pu, 0.05) + 0.05, pv, 0.22)
        de += 0.9 * _band(u - pu - (0.05 - pu) * (v - pv) / (0.2 - pv), w) * (v < 0.2)


# -----------------------------------------------------------------------------
# text: the report (positive sentences, then explicit negatives) and the clinical indication

_NEG = {CM: ["No cardiomegaly.", "Heart size is normal.", "Normal cardiac silhouette."],
        EFF: ["No pleural effusion.", "No effusion."], PTX: ["No pneumothorax."],
        CONS: ["No focal consolidation.", "No consolidation."], OPAC: ["No focal airspace opacity.", "No lung opacity."],
        NOD: ["No suspicious pulmonary nodule.", "No nodule."], EDEMA: ["No pulmonary edema.", "No edema."],
        ATEL: ["No atelectasis."]}
_NORMAL = ["No acute cardiopulmonary abnormality.", "The lungs are clear.", "Normal chest radiograph.",
           "Clear lungs. Normal heart size."]
_SIDE = {-1.0: "right", 1.0: "left"}

# zero-shot prompts in the reports' own words (train_clip.py --zs_prompts=phantom): class -> (positive, negative)
PROMPTS = {
    "Cardiomegaly": (["The heart is enlarged.", "Enlarged cardiac silhouette.", "Moderate cardiomegaly."], _NEG[CM]),
    "Pleural Effusion": (["Moderate right pleural effusion.", "Small left pleural effusion.",
                          "Moderate bilateral pleural effusions."], _NEG[EFF]),
    "Pneumothorax": (["Large right pneumothorax.", "Left apical pneumothorax with a visible pleural edge.",
                      "There is a small left pneumothorax."], _NEG[PTX]),
    "Consolidation": (["Right lower zone consolidation.", "Consolidation in the left mid lung, likely pneumonia.",
                       "Focal airspace consolidation in the right upper lung with air bronchograms."], _NEG[CONS]),
    "Lung Opacity": (["Hazy right mid zone opacity.", "Patchy bilateral opacities.", "Ill-defined opacity in the left lung."],
                     _NEG[OPAC]),
    "Nodule": (["Rounded nodule projecting over the right upper zone.", "30 mm nodule in the left mid lung.",
                "Well-defined left upper zone nodule, CT recommended."], _NEG[NOD]),
    "Edema": (["Moderate pulmonary edema.", "Bilateral perihilar haziness consistent with mild pulmonary edema.",
               "Interstitial edema with Kerley B lines."], _NEG[EDEMA]),
    "Atelectasis": (["Plate-like atelectasis at the right base.", "Left basilar atelectasis.",
                     "Subsegmental atelectasis in the right lower zone."], _NEG[ATEL]),
    "Support Devices": (["The endotracheal tube is in good position.", "NG tube with tip in the stomach.",
                         "Right internal jugular central venous catheter with tip in the SVC.", "Cardiac pacemaker in place."],
                        ["No lines or tubes."]),
    "No Finding": (_NORMAL, ["The heart is enlarged.", "Moderate right pleural effusion.", "Patchy bilateral opacities."]),
}


def _sev(x, cuts, words=("small", "moderate", "large")):
    return words[sum(c < x for c in cuts)]


def _zone(v):
    return "upper" if v < -0.2 else "mid" if v < 0.1 else "lower"


def _sentences(i, c, p, tr):
    """Positive sentences of study i, one per finding (and one per device)."""
    L, S, ch = c["labels"][i] > 0, [], tr.choice
    cap = lambda s: s[0].upper() + s[1:]  # noqa: E731
    dev = int(p["dev"][i])
    if dev & 1:
        S.append(ch(["Endotracheal tube terminates %d cm above the carina." % tr.randint(3, 6),
                     "ET tube in satisfactory position.", "The endotracheal tube is in good position."]))
    if dev & 2:
        S.append(ch(["Nasogastric tube courses below the diaphragm.", "Enteric tube tip in the stomach.",
                     "NG tube with tip in the stomach."]))
    if dev & 4:
        sd = _SIDE[p["cvc_side"][i]]
        S.append(ch(["%s internal jugular central venous catheter with tip in the SVC." % cap(sd),
                     "%s-sided central venous catheter terminates in the superior vena cava." % cap(sd),
                     "A %s subclavian catheter is seen with its tip at the cavoatrial junction." % sd]))
    if dev & 8:
        sd = _SIDE[np.sign(p["pm_u"][i])]
        S.append(ch(["%s chest wall pacemaker with a lead in the right ventricle." % cap(sd), "Cardiac pacemaker in place.",
                     "Pacemaker device overlies the %s chest, lead intact." % sd]))
    stable = "stable " if c["visit"][i] > 0 and tr.random() < 0.4 else ""
    if L[CM]:
        sev = _sev(p["heart"][i], [1.26, 1.36], ("mild", "moderate", "marked"))
        S.append(ch([cap(stable + "%s cardiomegaly." % sev), "The heart is enlarged.", "Enlarged cardiac silhouette.",
                     "%s enlargement of the cardiac silhouette." % cap(sev)]))
    if L[EFF]:
        sc = int(p["eff_side"][i])
        sev = _sev(p["eff_h"][i].max() if sc == 3 else p["eff_h"][i, sc - 1], [0.22, 0.36])
        sd = ["", "right", "left", "bilateral"][sc]
        s = "s" if sc == 3 else ""
        S.append(ch(["%s %s pleural effusion%s." % (cap(sev), sd, s),
                     "%s %s-sided effusion%s with blunting of the costophrenic angle%s." % (cap(sev), sd, s, s),
                     "There is a %s %s pleural effusion%s." % (sev, sd, s) if sc != 3 else "%s bilateral pleural effusions." % cap(sev),
                     "Blunting of %s costophrenic angle%s consistent with %s effusion%s." % ("both" if sc == 3 else "the " + sd, s, sev, s)]))
    if L[PTX]:
        sd, sev = _SIDE[p["ptx_side"][i]], _sev(p["ptx_d"][i], [0.11, 0.155])
        S.append(ch(["%s %s pneumothorax." % (cap(sev), sd), "%s apical pneumothorax with a visible pleural edge." % cap(sd),
                     "There is a %s %s pneumothorax." % (sev, sd), "%s pneumothorax on the %s." % (cap(sev), sd)]))
    if L[CONS]:
        sd, z = _SIDE[p["cons_side"][i]], _zone(p["cons_v"][i])
        S.append(ch(["%s %s zone consolidation." % (cap(sd), z), "Consolidation in the %s %s lung, likely pneumonia." % (sd, z),
                     "Focal airspace consolidation in the %s %s lung with air bronchograms." % (sd, z)]))
    if L[OPAC]:
        sd = "bilateral" if p["opac_two"][i] else _SIDE[p["opac_side"][i]]
        z = _zone(p["opac_v"][i, 0])
        S.append(ch(["Hazy %s %s zone opacity." % (sd, z), "Patchy %s opacities." % sd,
                     "Ill-defined opacity in the %s lung." % sd if sd != "bilateral" else "Ill-defined bilateral opacities."]))
    if L[NOD]:
        sd, z, mm = _SIDE[p["nod_side"][i]], _zone(p["nod_v"][i]), int(round(200 * p["nod_r"][i]))
        S.append(ch([cap(stable + "%d mm nodule in the %s %s lung." % (mm, sd, z)),
                     "Rounded nodule projecting over the %s %s zone." % (sd, z), "Well-defined %s %s zone nodule, CT recommended." % (sd, z)]))
    if L[EDEMA]:
        sev = _sev(p["edema"][i], [0.45, 0.53], ("mild", "moderate", "severe"))
        S.append(ch(["%s pulmonary edema." % cap(sev), "Bilateral perihilar haziness consistent with %s pulmonary edema." % sev,
                     "Interstitial edema with Kerley B lines.", "%s interstitial edema." % cap(sev)]))
    if L[ATEL]:
        sd = _SIDE[p["atel_side"][i]]
        if p["atel_lift"][i] > 0:
            S.append("%s basilar atelectasis with elevation of the hemidiaphragm." % cap(sd))
        else:
            S.append(ch(["Plate-like atelectasis at the %s base." % sd, "%s basilar atelectasis." % cap(sd),
                         "Subsegmental atelectasis in the %s lower zone." % sd]))
    return S


def _report(i, c, p, tr):
    L = c["labels"][i] > 0
    S = _sentences(i, c, p, tr)
    absent = [k for k in range(8) if not L[k]]
    if L[NOFIND]:
        S.append(tr.choice(_NORMAL))
    if EFF in absent and PTX in absent and tr.random() < 0.5:
        S.append("No pleural effusion or pneumothorax.")
        absent = [k for k in absent if k not in (EFF, PTX)]
    for k in tr.sample(absent, min(len(absent), tr.randint(1, 3))):
        S.append(tr.choice(_NEG[k]))
    return " ".join(S)


def _indication(i, c, p, tr):
    L, dev, r = c["labels"][i] > 0, int(p["dev"][i]), tr.random
    rules = [(dev & 7, 0.6, ["Line placement.", "Evaluate line placement.", "Check endotracheal tube position.",
                             "Intubated patient, evaluate tube position."]),
             (L[PTX], 0.5, ["Sudden onset chest pain.", "Status post lung biopsy.", "Trauma, rule out pneumothorax."]),
             (L[CONS] or L[OPAC], 0.5, ["Fever and cough.", "Productive cough, rule out pneumonia.", "Fever."]),
             (L[EDEMA] or L[EFF] or L[CM], 0.5, ["Shortness of breath.", "Dyspnea, history of heart failure.",
                                                 "Leg swelling and dyspnea."]),
             (L[NOD], 0.4, ["Follow-up of pulmonary nodule.", "History of smoking.", "Weight loss."]),
             (L[ATEL], 0.4, ["Post-operative, low oxygen saturation.", "Decreased breath sounds."]),
             (dev & 8, 0.4, ["Pacemaker check."]),
             (L[NOFIND], 0.5, ["Routine pre-operative.", "Pre-employment screening.", "Routine check-up."])]
    for cond, prob, texts in rules:
        if cond and r() < prob:
            return tr.choice(texts)
    return tr.choice(["Cough.", "Chest pain.", "Shortness of breath.", "Follow-up.", "Fever.", "Weakness.",
                      "Routine pre-operative."])


def label_report(text):
    """The phantom's labels recovered from its report: float32 (len(CLASSES),), 1 where labeler.label_reports (the
    labeler for real reports) finds the class positive. Every phantom class is one of its observations."""
    return (labeler.label_reports([text], CLASSES)[0] == 1).astype(np.float32)


# -----------------------------------------------------------------------------
# the generator


def disparity_rows(spec, c):
    """The images a disparity spec ("sex=F:0.4", "age>=70:0.5", "view=AP:0.3") makes subtler, and the fraction of
    a finding's contrast they keep: (bool mask (N,), strength in [0, 1)). c: _sample_cohort's arrays."""
    m = re.fullmatch(r"(sex|age|view)(=|>=|<)([A-Za-z0-9]+):([0-9]*\.?[0-9]+)", spec.replace(" ", ""))
    hint = "e.g. sex=F:0.4, age>=70:0.5, view=AP:0.3 (group:fraction of the finding contrast kept, in [0, 1))"
    if m is None:
        raise ValueError(f"phantom_disparity={spec!r} is not <column><op><value>:<strength>, {hint}")
    col, op, value, strength = m.group(1), m.group(2), m.group(3), float(m.group(4))
    if not 0 <= strength < 1:
        raise ValueError(f"phantom_disparity={spec!r}: strength {strength} must be in [0, 1), {hint}")
    if col == "age":
        if op == "=" or not value.isdigit():
            raise ValueError(f"phantom_disparity={spec!r}: age takes >= or < and a whole number of years, {hint}")
        return np.asarray(c["age"] >= int(value) if op == ">=" else c["age"] < int(value), bool), strength
    choices = {"sex": ("F", "M"), "view": ("AP", "PA")}[col]
    if op != "=" or value not in choices:
        raise ValueError(f"phantom_disparity={spec!r}: {col} takes = and {' or '.join(choices)}, {hint}")
    is_first = c["male"] == 0 if col == "sex" else c["ap"] == 1  # F, AP
    return np.asarray(is_first == (value == choices[0]), bool), strength


def generate(n_images, image_size=64, seed=0, disparity=""):
    """n_images studies: images uint8 (N, H, W), labels float32 (N, C), classes, records (one dict per image).
    disparity: "" (off) or a subgroup whose findings are drawn subtler (disparity_rows)."""
    if n_images < 1 or image_size < 16:
        raise ValueError(f"phantom.generate: need n_images >= 1 and image_size >= 16, got {n_images}, {image_size}")
    n, S = int(n_images), int(image_size)
    rng = np.random.default_rng(seed)
    c = _sample_cohort(n, rng)
    p = _sample_params(c, rng)
    if disparity:  # no random draw here: the other images stay as they are without the knob
        rows, strength = disparity_rows(disparity, c)
        p["finding_strength"] = np.where(rows, strength, 1.0)
        cm = rows & (c["labels"][:, CM] > 0)  # the enlargement above a normal heart (1.0), scaled like the contrast
        p["heart"] = np.where(cm, 1.0 + strength * (p["heart"] - 1.0), p["heart"])
    banks = _banks(S, seed)
    chunk = max(1, CHUNK_PIXELS // (S * S))
    ws = {k: np.empty((chunk, S, S), np.float32) for k in ("AU", "air", "dens", "t1", "t2")}
    images = np.empty((n, S, S), np.uint8)
    for i0 in range(0, n, chunk):
        images[i0:i0 + chunk] = _render(p, c["labels"], i0, min(n, i0 + chunk), banks, ws)
    tr = random.Random(seed)  # text choices: a separate stream, so text and pixels stay reproducible
    records = []
    for i in range(n):
        pid = f"phantom{seed}-{c['pat'][i]:06d}"
        records.append(dict(patient_id=pid, study_id=f"{pid}-s{c['visit'][i] + 1}", view="AP" if c["ap"][i] else "PA",
                            age=int(c["age"][i]), sex="M" if c["male"][i] else "F",
                            text=_report(i, c, p, tr), indication=_indication(i, c, p, tr)))
    return dict(images=images, labels=c["labels"], classes=list(CLASSES), records=records)


def main(argv=None):
    ap = argparse.ArgumentParser(description="phantom: generation speed on one core and an example grid")
    ap.add_argument("--n_images", type=int, default=4000)
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--png", default="", help="save a grid of the first 32 images here (e.g. phantom.png)")
    args = configurator.parse_args(ap, argv)  # n_images, image_size, seed: CONVENTIONS
    t0, c0 = time.perf_counter(), time.process_time()
    d = generate(args.n_images, args.image_size, args.seed)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{args.n_images} images at {args.image_size}px in {dt:.2f}s: {args.n_images / dt:.0f} img/s "
          f"({args.n_images / cpu:.0f} per CPU-second; one core, numpy elementwise ops are single-threaded)")
    prev = d["labels"].mean(0)
    print("prevalence: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in zip(CLASSES, prev)))
    for r in d["records"][:3]:
        print(f"{r['study_id']} {r['view']} {r['age']}{r['sex']} | {r['indication']} | {r['text']}")
    if args.png:
        from PIL import Image  # pillow is a project dependency; only the grid needs it
        k = min(32, len(d["images"]))
        g = np.zeros((4 * args.image_size, 8 * args.image_size), np.uint8)
        for j in range(k):
            g[j // 8 * args.image_size:(j // 8 + 1) * args.image_size, j % 8 * args.image_size:(j % 8 + 1) * args.image_size] = d["images"][j]
        Image.fromarray(g).save(args.png)
        print(f"saved {args.png}: the first {k} images, row-major")


if __name__ == "__main__":
    configurator.cli(main)
