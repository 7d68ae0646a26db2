"""From disk: `echosim validate` folders (measured against simulated) and `echosim sweep` tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from dashboards.common import list_folders, runs_dir, show_error
from echosim.spec.errors import InputError


@st.cache_data(show_spinner=False)
def _read_table(path: str, mtime: float) -> pd.DataFrame:
    return pd.read_parquet(path) if path.endswith(".parquet") else pd.read_csv(path)


def _pick(label: str, marker: str, key: str) -> Path | None:
    found = list_folders(marker)
    typed = st.text_input(f"{label} folder (or pick one found under {runs_dir()}/)", "", key=f"{key}_path")
    if typed.strip():
        p = Path(typed.strip())
        if not (p / marker).is_file():
            show_error(InputError(f"no {marker} in this folder", path=str(p)))
            return None
        return p
    if not found:
        st.info(f"No folder with {marker} under {runs_dir()}/ yet.")
        return None
    return Path(st.selectbox(label, [str(p) for p in found], key=key))


def validate_view() -> None:
    from echosim.plots import validate_cdf_figure, validate_figure

    folder = _pick("validate", "validation.json", "val")
    if folder is None:
        return
    try:
        result = json.loads((folder / "validation.json").read_text())
        rows = result["metrics"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        show_error(InputError(f"not a validation.json ({type(exc).__name__})", path=str(folder / "validation.json")))
        return
    st.pyplot(validate_figure(rows, f"{folder.name}: measured against simulated"))
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    if (folder / "engine" / "requests.csv").is_file() and (folder / "sim" / "requests.csv").is_file():
        st.pyplot(validate_cdf_figure(folder))


def sweep_view() -> None:
    from echosim.plots import sweep_figure
    from echosim.sweep.advisor import advise
    from echosim.sweep.table import CONFIG_COLUMNS, crossovers

    folder = _pick("sweep", "sweep.csv", "sw")
    if folder is None:
        return
    path = folder / "sweep.parquet" if (folder / "sweep.parquet").is_file() else folder / "sweep.csv"
    try:
        df = _read_table(str(path), path.stat().st_mtime)
        missing = {"policy", "load", "throughput_tok_s", *CONFIG_COLUMNS} - set(df.columns)
        if missing:
            raise InputError(f"not a sweep table: no column {sorted(missing)[0]!r}", path=str(path))
    except InputError as exc:
        show_error(exc)
        return
    except (OSError, ValueError) as exc:
        show_error(InputError(f"cannot read the table ({exc})", path=str(path)))
        return
    cross = crossovers(df)
    for conf, g in df.groupby(list(CONFIG_COLUMNS), sort=False, dropna=False):
        c = dict(zip(CONFIG_COLUMNS, conf, strict=True))
        sel = pd.Series(True, index=cross.index)
        for k, v in c.items():
            sel &= cross[k].astype(str) == str(v)
        st.pyplot(sweep_figure(g, cross[sel], f"{c['model']} on {c['replicas']} x TP{c['tp']} x {c['hardware']}"))
    st.subheader("Best policy per load (by goodput)")
    st.dataframe(advise(df), hide_index=True)
    with st.expander("table"):
        st.dataframe(df, hide_index=True)


def page() -> None:
    st.title("From disk: validation folders and sweep tables")
    tab1, tab2 = st.tabs(["validate", "sweep"])
    with tab1:
        validate_view()
    with tab2:
        sweep_view()


page()
