"""Procedural abdominal CT phantom with organ labels: the embedded default data set.

Every structure is an analytic shape (ellipsoid, superellipse cross-section, tapered tube,
box) in a millimetre "body frame" centred on the volume. Shapes are evaluated vectorised
only inside their bounding box, with an approximate signed distance that gives a one-voxel
partial-volume ramp, so the same subject comes out at 2 mm or 6 mm. Tissues are painted back
to front (body wall, bowel, organs, vessels, bone); the label of a voxel is the label of the
last shape that covers it, so labels always follow the painted HU. All randomness comes from
one ``numpy.random.Generator``; the anatomy draws never depend on the grid, only the noise does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from asa3d.atomic import atomic_path
from asa3d.data.msd_json import write_dataset_json

PHANTOM_LABELS: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "right kidney",
    3: "left kidney",
    4: "gallbladder",
    5: "liver",
    6: "stomach",
    7: "aorta",
    8: "inferior vena cava",
    9: "pancreas",
    10: "bladder",
    11: "portal and splenic vein",
    12: "vertebrae",
    13: "lungs",
}

# Nominal HU, portal-venous contrast phase (jittered per subject).
HU: dict[str, float] = {
    "air": -1000.0,
    "lung": -850.0,
    "fat": -100.0,
    "visceral_fat": -90.0,
    "skin": 30.0,
    "muscle": 50.0,
    "liver": 100.0,
    "spleen": 110.0,
    "pancreas": 85.0,
    "kidney_cortex": 180.0,
    "kidney_medulla": 70.0,
    "stomach_wall": 55.0,
    "fluid": 12.0,
    "gallbladder": 15.0,
    "bladder": 8.0,
    "bowel": 40.0,
    "aorta": 200.0,
    "ivc": 150.0,
    "portal_vein": 170.0,
    "heart": 120.0,
    "cortical_bone": 850.0,
    "cancellous_bone": 210.0,
    "posterior_elements": 600.0,
    "rib": 450.0,
    "disc": 90.0,
    "csf": 15.0,
    "table": 150.0,
}

_F = np.float32
Sd = np.ndarray  # signed distance in mm (negative inside) over a block


def _rot(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """Rotation about z (yaw), then y (pitch), then x (roll); angles in radians."""
    cz, sz, cy, sy, cx, sx = (
        np.cos(yaw),
        np.sin(yaw),
        np.cos(pitch),
        np.sin(pitch),
        np.cos(roll),
        np.sin(roll),
    )
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    return rz @ ry @ rx


class _Canvas:
    """The volume being painted, plus the body-frame <-> voxel geometry."""

    def __init__(self, shape: Sequence[int], spacing: Sequence[float], rot: np.ndarray, shift: np.ndarray):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.axes = [
            ((np.arange(n) - (n - 1) / 2) * s).astype(_F)
            for n, s in zip(self.shape, self.spacing, strict=True)
        ]
        self.rot, self.shift = rot.astype(_F), shift.astype(_F)
        self.edge = float(np.mean(self.spacing))  # width of the partial-volume ramp
        self.img = np.full(self.shape, HU["air"], _F)
        self.lab = np.zeros(self.shape, np.uint8)

    def block(self, lo: Sequence[float], hi: Sequence[float], world: bool = False):
        """Voxel slices covering a body-frame box, with body-frame coordinates of the block."""
        corners = np.array(list(itertools.product(*zip(lo, hi, strict=True))), dtype=np.float64)
        w = corners if world else corners @ self.rot.T.astype(np.float64) + self.shift
        wlo, whi = w.min(0) - self.edge, w.max(0) + self.edge
        sl = []
        for d in range(3):
            half = (self.shape[d] - 1) / 2
            i0 = max(0, int(np.floor(wlo[d] / self.spacing[d] + half)))
            i1 = min(self.shape[d], int(np.ceil(whi[d] / self.spacing[d] + half)) + 1)
            if i0 >= i1:
                return None, None
            sl.append(slice(i0, i1))
        gx, gy, gz = (self.axes[d][sl[d]] for d in range(3))
        if world:
            return tuple(sl), (gx[:, None, None], gy[None, :, None], gz[None, None, :])
        dx, dy, dz = (
            gx[:, None, None] - self.shift[0],
            gy[None, :, None] - self.shift[1],
            gz[None, None, :] - self.shift[2],
        )
        r = self.rot  # body = R^T (world - shift)
        return tuple(sl), (
            r[0, 0] * dx + r[1, 0] * dy + r[2, 0] * dz,
            r[0, 1] * dx + r[1, 1] * dy + r[2, 1] * dz,
            r[0, 2] * dx + r[1, 2] * dy + r[2, 2] * dz,
        )

    def paint(self, sl: tuple[slice, ...] | None, sd: Sd, hu: float | np.ndarray, label: int = 0) -> None:
        """Blend ``hu`` in with a partial-volume ramp; the label goes where the centre is inside."""
        if sl is None:
            return
        sd = np.broadcast_to(sd, tuple(s.stop - s.start for s in sl))
        cover = np.clip(0.5 - sd / self.edge, 0.0, 1.0)
        img = self.img[sl]
        img += cover * (np.asarray(hu, _F) - img)
        self.lab[sl][sd <= 0] = label

    def shape_paint(self, lo, hi, sd_fn: Callable, hu, label: int = 0, world: bool = False) -> None:
        sl, p = self.block(lo, hi, world)
        self.sl = sl  # lets shapes read their block of a precomputed full-volume field
        if sl is not None:
            out = sd_fn(*p)
            if isinstance(out, tuple):  # (sd, hu array)
                self.paint(sl, out[0], out[1], label)
            else:
                self.paint(sl, out, hu, label)


# --- signed-distance primitives (approximate, exact on the surface) --------------------------


def _ellipsoid_sd(x, y, z, c, r, rot=None):
    lx, ly, lz = x - c[0], y - c[1], z - c[2]
    if rot is not None:  # local = R^T p
        lx, ly, lz = (
            rot[0, 0] * lx + rot[1, 0] * ly + rot[2, 0] * lz,
            rot[0, 1] * lx + rot[1, 1] * ly + rot[2, 1] * lz,
            rot[0, 2] * lx + rot[1, 2] * ly + rot[2, 2] * lz,
        )
    g = np.sqrt((lx / r[0]) ** 2 + (ly / r[1]) ** 2 + (lz / r[2]) ** 2)
    grad = np.sqrt((lx / r[0] ** 2) ** 2 + (ly / r[1] ** 2) ** 2 + (lz / r[2] ** 2) ** 2)
    # First-order distance (g - 1) / |grad g|; deep inside it degenerates, use a safe bound.
    sd = g * (g - 1) / np.maximum(grad, 1e-6)
    return np.where(g < 0.5, (g - 1) * min(r), sd).astype(_F)


def _ellipse2_sd(x, y, a, b_ant, b_post):
    """2-D elliptic cross-section (extruded along z), deeper or shallower behind (y < 0)."""
    b = np.where(y < 0, np.asarray(b_post, _F), np.asarray(b_ant, _F))
    ux, uy = x / a, y / b
    g = np.sqrt(ux * ux + uy * uy)
    grad = np.sqrt((ux / a) ** 2 + (uy / b) ** 2)
    return (g * (g - 1) / np.maximum(grad, 1e-6)).astype(_F, copy=False)


def _tube_sd(x, y, z, pts, radii):
    """Union of tapered capsules along a polyline."""
    pts = np.asarray(pts, np.float64)
    out = None
    for (a, b), (ra, rb) in zip(itertools.pairwise(pts), itertools.pairwise(radii), strict=True):
        d = b - a
        t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / float(d @ d)
        t = np.clip(t, 0, 1)
        dist = np.sqrt((x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2)
        sd = dist - (ra + t * (rb - ra))
        out = sd if out is None else np.minimum(out, sd)
    return out.astype(_F)


def _tube_box(pts, radii):
    pts = np.asarray(pts)
    r = max(radii)
    return pts.min(0) - r, pts.max(0) + r


def _box_sd(x, y, z, c, h):
    qx, qy, qz = np.abs(x - c[0]) - h[0], np.abs(y - c[1]) - h[1], np.abs(z - c[2]) - h[2]
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
    return (outside + np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)).astype(_F)


class _Lattice:
    """Smooth random field on a fixed millimetre lattice: identical at every voxel size."""

    EXTENT = 260.0

    def __init__(self, rng: np.random.Generator, cell: float):
        n = int(2 * self.EXTENT / cell) + 3
        v = ndimage.gaussian_filter(rng.standard_normal((n, n, n)).astype(_F), 0.8, mode="wrap")
        self.v = v / v.std()
        self.cell = cell

    def __call__(self, x, y, z) -> np.ndarray:
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        coords = [((np.broadcast_to(a, shape) + self.EXTENT) / self.cell).ravel() for a in (x, y, z)]
        return ndimage.map_coordinates(self.v, coords, order=1, mode="nearest").reshape(shape)


# --- the subject ------------------------------------------------------------------------------


def _draw_subject(rng: np.random.Generator) -> dict:
    """All anatomical random draws, in a fixed order (so they never depend on the grid)."""

    def u(lo: float, hi: float) -> float:
        return float(rng.uniform(lo, hi))

    def j(scale: float) -> np.ndarray:  # position jitter (mm)
        return rng.uniform(-scale, scale, 3)

    s: dict = {}
    # Global pose: small rotation and offset of the patient in the scanner.
    s["rot"] = _rot(np.deg2rad(u(-4, 4)), np.deg2rad(u(-2, 2)), np.deg2rad(u(-3, 3)))
    s["shift"] = np.array([u(-8, 8), u(-6, 6), u(-12, 12)])
    # Habitus: peritoneal cavity size, then wall muscle and subcutaneous fat around it.
    s["cav_a"], s["cav_b"], s["ys0"] = u(112, 132), u(76, 96), -u(38, 48)
    s["muscle"], s["fat"] = u(8, 13), u(12, 36)
    s["fat_post"] = s["fat"] * u(0.55, 0.9)
    s["lordosis"] = u(4e-4, 8e-4)
    s["vpitch"] = u(32, 37)
    s["vphase"] = u(0, 1)
    s["diaph_r"], s["diaph_l"] = u(152, 166), u(142, 156)
    s["organ_scale"] = {
        k: u(0.87, 1.13) for k in ("liver", "spleen", "kidney", "stomach", "pancreas", "gb", "bladder")
    }
    s["jit"] = {
        k: j(9) for k in ("liver", "spleen", "kr", "kl", "stomach", "pancreas", "gb", "bladder", "heart")
    }
    s["ang"] = {
        k: np.deg2rad(rng.uniform(-10, 10, 3))
        for k in ("liver", "spleen", "kr", "kl", "stomach", "gb", "bladder")
    }
    s["aorta_r"], s["ivc_r"], s["bif"] = u(10, 13), u(10, 13), u(-5, 20)
    s["stomach_fill"] = u(0.15, 0.6)  # air-fluid level as a fraction of the stomach depth
    s["hu"] = {k: v + float(rng.normal(0, 0.06 * abs(v) + 3)) for k, v in HU.items()}
    s["hu"]["air"], s["hu"]["fat"] = HU["air"], HU["fat"] + u(-10, 10)
    s["bowel"], s["bowel_air"], s["texture"] = _Lattice(rng, 11.0), _Lattice(rng, 11.0), _Lattice(rng, 6.0)
    s["noise_sd"] = u(10, 18)
    s["waves"] = [(rng.normal(0, 1, 3), u(250, 600), u(0, 2 * np.pi), u(2, 6)) for _ in range(4)]
    return s


def _paint_subject(cv: _Canvas, s: dict) -> None:
    hu = s["hu"]
    ca, cb, mus, fat, fatp, ys0 = s["cav_a"], s["cav_b"], s["muscle"], s["fat"], s["fat_post"], s["ys0"]
    cbp = -ys0 + 32  # the cavity (retroperitoneal fat included) reaches behind the vertebral body
    wall_post = -ys0 + 72  # posterior muscle reaches behind the spinous processes
    # "Infinite" extent of extruded shapes (body, spine, table): beyond any corner of the grid.
    big = 1.5 * max(float(np.abs(a).max()) for a in cv.axes) + 150.0

    def ys(z):  # spine centre line (y), lordotic
        return ys0 - s["lordosis"] * (z - 50.0) ** 2

    def flare(z):  # lower chest wider, pelvis a little narrower in AP
        return 1 + 0.06 / (1 + np.exp(-(z - 90) / 25)) - 0.04 / (1 + np.exp((z + 90) / 25))

    def diaph(x, y):  # diaphragm height: two domes, lower towards the periphery
        # The posterior costophrenic recesses are the deepest, the anterior ones shallow.
        ry = 60 * (y + 5) ** 2 / (0.9 * cb) ** 2 * np.where(y < -5, 1.0, 0.25)
        zr = s["diaph_r"] - 40 * (x - 0.4 * ca) ** 2 / (0.6 * ca) ** 2 - ry
        zl = s["diaph_l"] - 40 * (x + 0.4 * ca) ** 2 / (0.6 * ca) ** 2 - ry
        return np.maximum(zr, zl)

    # CT table in the world frame (the patient may be rotated on it).
    Bp, A = wall_post + fatp, ca + mus + fat
    ty = s["shift"][1] - Bp - 6
    cv.shape_paint(
        (-230, ty - 22, -big),
        (230, ty, big),
        lambda x, y, z: _box_sd(x, y, z, (0, ty - 11, 0), (210, 11, big)),
        hu["table"],
        world=True,
    )
    cv.shape_paint(
        (-230, ty - 22, -big),
        (230, ty, big),
        lambda x, y, z: _box_sd(x, y, z, (0, ty - 11, 0), (205, 8, big)),
        -500.0,
        world=True,
    )

    # Body wall: skin, subcutaneous fat, muscle, then the cavity (visceral fat). These three
    # surfaces are evaluated once on the whole volume; later shapes clip against them.
    sl_all, (X, Y, Z) = cv.block((-big, -big, -big), (big, big, big))
    assert all(sl.start == 0 and sl.stop == n for sl, n in zip(sl_all, cv.shape, strict=True))
    F = flare(Z)
    body_full = np.maximum(_ellipse2_sd(X, Y, (ca + mus + fat) * F, (cb + mus + fat) * F, Bp * 1.15), -Bp - Y)
    wall_full = np.maximum(
        _ellipse2_sd(X, Y, (ca + mus) * F, (cb + mus) * F, wall_post * 1.15), -wall_post - Y
    )
    cav_full = _ellipse2_sd(X, Y, ca * F, cb * F, cbp)
    del X, Y, Z, F
    cv.paint(sl_all, body_full, hu["skin"])
    cv.paint(sl_all, body_full + 2.5, hu["fat"])
    cv.paint(sl_all, wall_full, hu["muscle"])
    cv.paint(sl_all, cav_full, hu["visceral_fat"])

    def cavity_sd(x, y, z):
        return cav_full[cv.sl]

    def wall(x, y, z):
        return wall_full[cv.sl]

    def inside(sd_fn):  # clip a shape to the peritoneal cavity
        return lambda x, y, z: np.maximum(sd_fn(x, y, z), cavity_sd(x, y, z))

    # Posterior muscles: paraspinal (erector spinae), psoas growing downwards, gluteals low.
    for side in (-1, 1):
        cv.shape_paint(
            (side * 40 - 35, ys0 - 110, -big),
            (side * 40 + 35, ys0 - 20, big),
            lambda x, y, z, sd=side: np.maximum(
                _ellipse2_sd(x - sd * 38, y - (ys(z) - 54), 32.0, 28.0, 28.0), wall(x, y, z) + 1
            ),
            hu["muscle"],
        )
        cv.shape_paint(
            (side * 45 - 40, ys0 - 40, -big),
            (side * 45 + 40, ys0 + 45, 120),
            lambda x, y, z, sd=side: np.maximum(
                _ellipse2_sd(
                    x - sd * (32 + 0.12 * np.clip(100 - z, 0, 200)),
                    y - ys(z) + 2 - 0.1 * np.clip(60 - z, 0, 100),
                    np.clip(6 + 0.14 * (110 - z), 6, 26),
                    np.clip(6 + 0.12 * (110 - z), 6, 22),
                    np.clip(6 + 0.12 * (110 - z), 6, 22),
                ),
                z - 110,
            ),
            hu["muscle"],
        )
        cv.shape_paint(
            (side * 90 - 70, -Bp, -big),
            (side * 90 + 70, ys0, -30),
            lambda x, y, z, sd=side: np.maximum(
                np.maximum(
                    _ellipsoid_sd(x, y, z, (sd * 80, ys0 - 45, -175), (65, 45, 160)), wall(x, y, z) + 1
                ),
                z + 35,
            ),
            hu["muscle"],
        )

    # Thorax: diaphragm muscle, lung bases above it, heart in front.
    zlo = min(s["diaph_r"], s["diaph_l"]) - 120
    thorax = (-ca * 1.2, -cbp - 5, zlo), (ca * 1.2, cb * 1.2, big)
    cv.shape_paint(*thorax, inside(lambda x, y, z: (diaph(x, y) - 5 - z).astype(_F)), hu["muscle"])
    tex = s["texture"]

    def lung(x, y, z):
        sd = np.maximum((diaph(x, y) + 3 - z).astype(_F), cavity_sd(x, y, z) + 4)
        # Denser (brighter) posteriorly where the lung is dependent, with vessel-like mottling.
        t = tex(x, y, z)
        val = hu["lung"] + 40 * np.clip(-y / cbp, -1, 1) + np.where(t > 1.7, 650.0, 0.0)
        return sd, val

    cv.shape_paint(*thorax, lung, 0, label=13)
    hc = np.array([-0.15 * ca, 0.35 * cb, s["diaph_l"] + 40]) + s["jit"]["heart"]
    cv.shape_paint(
        hc - 90,
        hc + 90,
        lambda x, y, z: np.maximum(
            _ellipsoid_sd(x, y, z, hc, (0.55 * ca, 0.6 * cb, 70)), (diaph(x, y) + 3 - z).astype(_F)
        ),
        hu["heart"],
    )

    # Ribs: oblique bands in the inner chest wall, descending anteriorly, absent near the midline.
    def ribs(x, y, z):
        f = flare(z)
        sd_in = _ellipse2_sd(x, y, ca * f + 6, cb * f + 6, cbp + 4)
        theta = np.arctan2(y, x)
        zz = z + 80 * (1 + np.sin(theta)) / 2  # ribs run lower anteriorly
        phase = (zz - 100) / 26.0
        band = (np.abs(phase - np.floor(phase) - 0.5) * 26.0 - 5.0).astype(_F)
        # Lower ribs are short (floating ribs end laterally); none cross the anterior midline.
        ok = (phase > 0) & (np.abs(x) > 28) & (np.sin(theta) < np.minimum(-0.3 + 0.3 * np.floor(phase), 0.85))
        sd = np.maximum(np.abs(sd_in) - 4, band)
        return np.where(ok, sd, 50).astype(_F)

    cv.shape_paint((-A, -Bp, 20), (A, cb + mus + 10, big), ribs, hu["rib"])

    # Bowel: loops (wall/content) with gas pockets between the liver and the bladder.
    bowel_l, gas_l = s["bowel"], s["bowel_air"]

    def bowel(x, y, z):
        # Loops are the super-level set of a smooth random field: walls near the level, content
        # inside, and gas in a few loops (where a second field is high).
        n = bowel_l(x, y, z)
        sd = np.maximum(cavity_sd(x, y, z) + 3, (0.15 - n) * 12).astype(_F)
        sd = np.maximum(sd, (z - 85 - 0.3 * x).astype(_F))  # stay below the upper abdomen
        val = np.where(n > 0.55, hu["fluid"] + 15, hu["bowel"] + 15).astype(_F)
        val = np.where((gas_l(x, y, z) > 1.4) & (n > 0.6), -900.0, val)
        return sd, val

    cv.shape_paint((-ca * 1.1, -cbp, -big), (ca * 1.1, cb * 1.1, 130), bowel, 0)

    # Colon frame: ascending (right), descending (left), transverse, with mottled stool/gas.
    def colon(x, y, z):
        sd = _tube_sd(
            x,
            y,
            z,
            [
                (0.78 * ca, -10, -50),
                (0.8 * ca, 0, 75),
                (0.45 * ca, 0.55 * cb, 85),
                (-0.45 * ca, 0.55 * cb, 92),
                (-0.8 * ca, 0, 95),
                (-0.78 * ca, -5, -50),
            ],
            [22, 22, 20, 20, 20, 18],
        )
        m = tex(x, y, z)
        val = np.where(m > 0.3, -850.0, np.where(m > -0.6, -150 + 120 * m, hu["bowel"])).astype(_F)
        return np.maximum(sd, cavity_sd(x, y, z) + 2), val

    cv.shape_paint((-ca, -cbp, -100), (ca, cb, 130), colon, 0)

    # Stomach (left upper quadrant): wall, fluid, and gas rising anteriorly (supine).
    sc = np.array([-0.42 * ca, 0.25 * cb, s["diaph_l"] - 40]) + s["jit"]["stomach"]
    sr = np.array([40.0, 34.0, 48.0]) * s["organ_scale"]["stomach"]
    srot = _rot(*(s["ang"]["stomach"] + (np.deg2rad(-25), 0, 0)))
    level = sc[1] + sr[1] * (1 - 2 * s["stomach_fill"])

    def stomach(x, y, z):
        sd = np.maximum(_ellipsoid_sd(x, y, z, sc, sr, srot), cavity_sd(x, y, z) + 2)
        sd = np.maximum(sd, (z - diaph(x, y) + 6).astype(_F))
        inner = _ellipsoid_sd(x, y, z, sc, sr - 4, srot)
        val = np.where(inner < 0, np.where(y > level, -950.0, hu["fluid"] + 10), hu["stomach_wall"]).astype(
            _F
        )
        return sd, val

    cv.shape_paint(sc - 60, sc + 60, stomach, 0, label=6)

    # Liver: right lobe + left lobe, under the right dome and inside the cavity.
    lsc = s["organ_scale"]["liver"]
    lc = np.array([0.5 * ca, 0.0, s["diaph_r"] - 65]) + s["jit"]["liver"]
    lrot = _rot(*s["ang"]["liver"])
    llc = lc + np.array([-0.62 * ca, 0.45 * cb, 25])

    def liver(x, y, z):
        sd = np.minimum(
            _ellipsoid_sd(x, y, z, lc, np.array([0.75 * ca, 1.0 * cb, 88]) * lsc, lrot),
            _ellipsoid_sd(x, y, z, llc, np.array([0.5 * ca, 0.42 * cb, 38]) * lsc, lrot),
        )
        sd = np.maximum(np.maximum(sd, cavity_sd(x, y, z) + 1), (z - diaph(x, y) + 6).astype(_F))
        return sd, hu["liver"] + 6 * tex(x, y, z)

    cv.shape_paint(lc - np.array([180, 120, 110]), lc + np.array([100, 120, 110]), liver, 0, label=5)

    # Gallbladder at the inferior surface of the right lobe.
    gc = np.array([0.38 * ca, 0.5 * cb, lc[2] - 35]) + s["jit"]["gb"]
    gr = np.array([15.0, 14.0, 34.0]) * s["organ_scale"]["gb"]
    grot = _rot(*(s["ang"]["gb"] + (0, 0, np.deg2rad(30))))
    cv.shape_paint(
        gc - 40, gc + 40, lambda x, y, z: _ellipsoid_sd(x, y, z, gc, gr, grot), hu["gallbladder"], 4
    )

    # Spleen: posterolateral left, long axis along the ribs.
    spc = np.array([-0.66 * ca, ys0 + 12, s["diaph_l"] - 45]) + s["jit"]["spleen"]
    spr = np.array([27.0, 60.0, 50.0]) * s["organ_scale"]["spleen"]
    sprot = _rot(*(s["ang"]["spleen"] + (np.deg2rad(-40), 0, 0)))
    cv.shape_paint(
        spc - 70,
        spc + 70,
        lambda x, y, z: np.maximum(
            np.maximum(_ellipsoid_sd(x, y, z, spc, spr, sprot), cavity_sd(x, y, z) + 1),
            (z - diaph(x, y) + 6).astype(_F),
        ),
        hu["spleen"],
        1,
    )

    # Kidneys: cortex (bright) around medulla, renal sinus fat at the hilum; right one lower.
    ksc = s["organ_scale"]["kidney"]
    for key, side, lab_id, zc in (("kr", 1, 2, 65.0), ("kl", -1, 3, 80.0)):
        kc = np.array([side * 0.58 * ca, ys0 + 6, zc]) + s["jit"][key]
        kr = np.array([27.0, 22.0, 55.0]) * ksc
        krot = _rot(*(s["ang"][key] + (np.deg2rad(side * 30), np.deg2rad(-side * 10), 0)))
        hilum = kc + krot @ np.array([-side * 0.8 * kr[0], 0, 0])
        kth = 7.0
        cv.shape_paint(
            kc - 65,
            kc + 65,
            lambda x, y, z, c=kc, r=kr, R=krot: _ellipsoid_sd(x, y, z, c, r, R),
            hu["kidney_cortex"],
            lab_id,
        )

        def medulla(x, y, z, c=kc, r=kr - kth, R=krot):
            sd = _ellipsoid_sd(x, y, z, c, r, R)
            return sd, hu["kidney_medulla"] + 15 * tex(x, y, z)

        cv.shape_paint(kc - 65, kc + 65, medulla, 0, lab_id)
        cv.shape_paint(
            hilum - 30,
            hilum + 30,
            lambda x, y, z, c=hilum, R=krot: _ellipsoid_sd(x, y, z, c, (12, 10, 22), R),
            -60.0,
        )

    # Pancreas: head by the duodenum (right), neck over the vessels, tail to the splenic hilum.
    psc = s["organ_scale"]["pancreas"]
    pj = s["jit"]["pancreas"]
    zp = s["diaph_r"] - 80 + pj[2]
    pan = [
        (0.32 * ca, ys0 + 44, zp - 12),
        (0.05 * ca, ys0 + 62, zp),
        (-0.3 * ca, ys0 + 56, zp + 6),
        (-0.55 * ca, ys0 + 30, zp + 14),
    ]
    pan = [np.array(p) + pj * (1, 1, 0) for p in pan]
    prad = [r * psc for r in (17.0, 11.0, 11.0, 9.0)]
    lo, hi = _tube_box(pan, prad)
    cv.shape_paint(
        lo, hi, lambda x, y, z: (_tube_sd(x, y, z, pan, prad), hu["pancreas"] + 10 * tex(x, y, z)), 0, 9
    )

    # Portal system: splenic vein behind the pancreas, SMV up to the confluence, portal vein to the hilum.
    conf = pan[1] + (0, -12, -2)
    pv = [
        pan[0] * (1, 0, 0) + (0, ys0 + 40, zp - 40),
        conf,
        conf + (0.2 * ca, -8, 22),
        lc * (0.7, 0, 0) + (0, ys0 + 45, zp + 35),
    ]
    spv = [conf, pan[2] + (0, -11, 0), pan[3] + (0, -11, 0), spc + (0.5 * spr[0], 10, -10)]
    for pts, rr in ((pv, [5.0, 7.0, 7.0, 6.0]), (spv, [6.0, 5.0, 5.0, 5.0])):
        lo, hi = _tube_box(pts, rr)
        cv.shape_paint(lo, hi, lambda x, y, z, p=pts, r=rr: _tube_sd(x, y, z, p, r), hu["portal_vein"], 11)

    # Great vessels: IVC (right, into the liver), aorta (left-anterior of the spine) + iliacs.
    ar, ir, bif = s["aorta_r"], s["ivc_r"], s["bif"]
    ivc = [
        (0.18 * ca, ys0 + 22, bif - 12),
        (0.2 * ca, ys0 + 24, 70),
        (0.17 * ca, ys0 + 30, 150),
        (0.1 * ca, ys0 + 45, 230),
    ]
    cv.shape_paint(*_tube_box(ivc, [ir] * 4), lambda x, y, z: _tube_sd(x, y, z, ivc, [ir] * 4), hu["ivc"], 8)
    aorta = [
        (-0.1 * ca, ys(bif) + 27, bif),
        (-0.1 * ca, ys0 + 30, 60),
        (-0.06 * ca, ys0 + 26, 140),
        (-0.1 * ca, ys0 + 20, 240),
    ]
    cv.shape_paint(
        *_tube_box(aorta, [ar] * 4), lambda x, y, z: _tube_sd(x, y, z, aorta, [ar] * 4), hu["aorta"], 7
    )
    for side in (-1, 1):
        art = [
            aorta[0],
            (side * 0.35 * ca, ys(bif - 60) + 45, bif - 75),
            (side * 0.55 * ca, 0.1 * cb, bif - 160),
        ]
        vein = [ivc[0], (side * 0.3 * ca, ys(bif - 60) + 32, bif - 75), (side * 0.5 * ca, 0.0, bif - 160)]
        cv.shape_paint(
            *_tube_box(vein, [9, 8, 8]), lambda x, y, z, p=vein: _tube_sd(x, y, z, p, [9, 8, 8]), hu["ivc"]
        )
        cv.shape_paint(
            *_tube_box(art, [7, 6, 6]), lambda x, y, z, p=art: _tube_sd(x, y, z, p, [7, 6, 6]), hu["aorta"]
        )

    # Bladder low in the pelvis, anterior.
    bc = np.array([0.0, 0.3 * cb, -110.0]) + s["jit"]["bladder"]
    br = np.array([45.0, 35.0, 33.0]) * s["organ_scale"]["bladder"]
    brot = _rot(*s["ang"]["bladder"])
    cv.shape_paint(bc - 50, bc + 50, lambda x, y, z: _ellipsoid_sd(x, y, z, bc, br, brot), hu["bladder"], 10)

    _paint_bones(cv, s, ys, big)


def _paint_bones(cv: _Canvas, s: dict, ys: Callable, big: float) -> None:
    hu, ca = s["hu"], s["cav_a"]
    ys0 = s["ys0"]
    # Pelvis: iliac wings (curved plates), sacrum, femoral heads.
    for side in (-1, 1):
        # Iliac wing: a thin bowl-shaped plate flaring out from the sacroiliac joint.
        axis = np.array([side * 0.5 * ca, ys0 + 55])

        def wing(x, y, z, c=axis, sd_=side):
            dx, dy = x - c[0], y - c[1]
            r = np.sqrt(dx**2 + dy**2)
            shell = np.abs(r - (40 + 0.25 * np.clip(z + 135, 0, None))) - 3.5
            theta = np.arctan2(dy, sd_ * dx)  # 0 = lateral, -pi/2 = posterior
            arc = np.maximum(-1.75 - theta, theta - 0.1) * 40  # from posteromedial round to lateral
            return np.maximum(np.maximum(shell, arc), np.maximum(z + 15, -135 - z)).astype(_F)

        cv.shape_paint(
            (axis[0] - 160, axis[1] - 160, -150),
            (axis[0] + 160, axis[1] + 160, 0),
            wing,
            hu["posterior_elements"],
        )
        fc = np.array([side * 0.72 * ca, ys0 + 60, -128.0])
        cv.shape_paint(
            fc - 30,
            fc + 30,
            lambda x, y, z, c=fc: _ellipsoid_sd(x, y, z, c, (25, 25, 25)),
            hu["cortical_bone"] * 0.7,
        )
        cv.shape_paint(
            fc - 30,
            fc + 30,
            lambda x, y, z, c=fc: _ellipsoid_sd(x, y, z, c, (21, 21, 21)),
            hu["cancellous_bone"],
        )
    pitch, zs = s["vpitch"], -25.0 + s["vphase"] * s["vpitch"]  # zs: centre of L5
    sac = np.array([0.0, ys(zs - 60) - 8, zs - pitch / 2 - 42])
    srot = _rot(0, 0, np.deg2rad(-28))
    cv.shape_paint(
        sac - 70,
        sac + 70,
        lambda x, y, z: _ellipsoid_sd(x, y, z, sac, (46, 17, 56), srot),
        hu["cortical_bone"] * 0.6,
    )
    cv.shape_paint(
        sac - 70,
        sac + 70,
        lambda x, y, z: _ellipsoid_sd(x, y, z, sac, (42, 13, 52), srot),
        hu["cancellous_bone"],
    )

    # Vertebral column from L5 upwards: discs, bodies (cortex + cancellous), neural arch, canal.
    vx, vy = 23.0, 17.0
    cv.shape_paint(
        (-30, ys0 - 60, zs - 20),
        (30, ys0 + 30, big),
        lambda x, y, z: np.maximum(_ellipse2_sd(x, y - ys(z), vx, vy, vy), zs - 15 - z),
        hu["disc"],
    )
    centers = np.arange(zs, big, pitch)
    for zc in centers:
        h = pitch / 2 - 4.0
        yc = ys(zc)

        def body(x, y, z, zc=zc, h=h, t=0.0):
            return np.maximum(_ellipse2_sd(x, y - ys(z), vx - t, vy - t, vy - t), np.abs(z - zc) - (h - t))

        lo, hi = (-vx - 5, yc - 90, zc - pitch), (vx + 5, yc + vy + 25, zc + pitch)
        cv.shape_paint(lo, hi, body, hu["cortical_bone"], 12)
        cv.shape_paint(lo, hi, lambda x, y, z, f=body: f(x, y, z, t=3.0), hu["cancellous_bone"], 12)
        cy = yc - vy - 11  # spinal canal centre

        def arch(x, y, z, zc=zc, cy=cy, h=h):
            r = np.sqrt(x**2 + (y - cy) ** 2)
            ring = np.maximum(np.abs(r - 13) - 4, np.abs(z - zc + 2) - h - 3)  # facets bridge the discs
            spinous = _box_sd(x, y, z, (0, cy - 24, zc - 6), (4.0, 11, 8))
            transverse = _box_sd(np.abs(x), y, z, (26, cy + 4, zc + 2), (11, 5, 6))
            return np.minimum(np.minimum(ring, spinous), transverse).astype(_F)

        cv.shape_paint(lo, hi, arch, hu["posterior_elements"], 12)
    cv.shape_paint(
        (-15, ys0 - 60, -big),
        (15, ys0, big),
        lambda x, y, z: (np.sqrt(x**2 + (y - ys(z) + vy + 11) ** 2) - 9).astype(_F),
        hu["csf"],
    )


def _finish(cv: _Canvas, s: dict, rng: np.random.Generator) -> np.ndarray:
    """Smooth intensity inhomogeneity inside the body, then correlated CT noise."""
    img = cv.img
    body = img > -500
    field = np.zeros(cv.shape, _F)
    for direction, wavelength, phase, amp in s["waves"]:
        # cos(k.p + phase) as the real part of a separable product of 1-D complex exponentials.
        k = direction / np.linalg.norm(direction) * 2 * np.pi / wavelength
        e = [
            np.exp(1j * (k[d] * cv.axes[d] + (phase if d == 0 else 0))).astype(np.complex64) for d in range(3)
        ]
        field += _F(amp) * (e[0][:, None, None] * (e[1][:, None] * e[2][None, :])[None]).real
    img += field * body
    noise = rng.standard_normal(cv.shape, dtype=_F)
    noise = ndimage.gaussian_filter(noise, 0.7, mode="nearest")
    noise *= _F(s["noise_sd"]) / max(float(noise.std()), 1e-6)
    img += noise
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


def phantom_affine(shape: Sequence[int], spacing: Sequence[float]) -> np.ndarray:
    """RAS affine with the volume centre at the world origin."""
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:3, 3] = [-(n - 1) / 2 * sp for n, sp in zip(shape, spacing, strict=True)]
    return aff


def make_phantom(
    seed: int | Sequence[int],
    shape: Sequence[int] = (96, 96, 80),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One subject -> (image int16 HU, label uint8, 4x4 RAS affine); array axes (x, y, z).

    x runs towards the patient's right, y anterior, z superior (nibabel RAS). ``seed`` may be an
    int or a tuple such as ``(seed, subject_index)``. The anatomy is defined in millimetres, so
    changing ``shape``/``spacing`` only changes the sampling (and the noise), not the subject.
    """
    if len(shape) != 3 or len(spacing) != 3 or min(shape) < 1 or min(spacing) <= 0:
        raise ValueError(f"shape and spacing must be 3 positive values, got {shape}, {spacing}")
    rng = np.random.default_rng(seed)
    s = _draw_subject(rng)
    cv = _Canvas(shape, spacing, s["rot"], s["shift"])
    _paint_subject(cv, s)
    image = _finish(cv, s, rng)
    return image, cv.lab, phantom_affine(shape, spacing)


def write_phantom_dataset(
    out_dir: str | Path,
    n: int,
    seed: int = 0,
    shape: Sequence[int] = (96, 96, 80),
    spacing: Sequence[float] = (4.0, 4.0, 4.0),
    n_validation: int = 0,
) -> Path:
    """Write ``n`` phantoms as an MSD-style data set; the last ``n_validation`` go to validation.

    Subject ``i`` is drawn from seed ``(seed, i)``, so it is the same whatever ``n`` is.
    Returns the path of ``dataset.json``.
    """
    import nibabel as nib

    if n < 1 or not 0 <= n_validation <= n:
        raise ValueError(f"need n >= 1 and 0 <= n_validation <= n, got n={n}, n_validation={n_validation}")
    out = Path(out_dir)
    # dataset.json is the completion marker (written last, atomically): drop an old one first so
    # a rewrite killed midway is never mistaken for a finished data set
    (out / "dataset.json").unlink(missing_ok=True)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(n):
        image, label, affine = make_phantom((seed, i), shape, spacing)
        name = f"phantom_{i:03d}.nii.gz"
        for sub, arr in (("imagesTr", image), ("labelsTr", label)):
            img = nib.Nifti1Image(arr, affine)
            img.header.set_xyzt_units("mm", "sec")
            img.header.set_qform(affine, code=1)
            img.header.set_sform(affine, code=1)
            with atomic_path(out / sub / name) as tmp:
                nib.save(img, tmp)
        entries.append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}"})
    n_train = n - n_validation
    return write_dataset_json(
        out / "dataset.json",
        name="asa3d-phantom",
        labels=PHANTOM_LABELS,
        training=entries[:n_train],
        validation=entries[n_train:],
        description=(
            f"Procedural abdominal CT phantom (asa3d), seed {seed}, shape {tuple(shape)}, "
            f"spacing {tuple(spacing)} mm"
        ),
    )
