"""Test inputs for clinflow's imaging tests, made from the sample files
pydicom ships (pydicom.data): each sample copied with the PatientID set to
a trial subject and fresh Study/Series/SOP Instance UIDs, so that samples
which share UIDs (MR_small and its compressed variants) become distinct
instances.

usage: prepare.py OUT_DIR SPEC...
  SPEC is NAME:PATIENT:STUDY_KEY[:COUNT]; samples with the same STUDY_KEY
  share one study; COUNT > 1 makes a series of COUNT instances (instance
  numbers 1..COUNT, positions 5 mm apart along the slice normal).
Prints a JSON manifest: [{file, sample, study, series, sop, sop_class,
  transfer_syntax, modality, patient, instance}].
"""
import json
import os
import sys

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid


def main():
    out, specs = sys.argv[1], sys.argv[2:]
    os.makedirs(out, exist_ok=True)
    studies = {}
    manifest = []
    for n, spec in enumerate(specs):
        parts = spec.split(":")
        name, patient, key = parts[0], parts[1], parts[2]
        count = int(parts[3]) if len(parts) > 3 else 1
        study = studies.setdefault(key, generate_uid())
        series = generate_uid()
        for i in range(count):
            ds = pydicom.dcmread(get_testdata_file(name))
            ds.PatientID = patient
            ds.PatientName = "Test^Imaging"
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            sop = generate_uid()
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            if count > 1:
                ds.InstanceNumber = i + 1
                if "ImagePositionPatient" in ds:
                    x, y, _z = [float(v) for v in ds.ImagePositionPatient]
                    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
                    ds.ImagePositionPatient = [x, y, 5.0 * i]
            path = os.path.join(out, f"{n:03d}-{i:03d}-{name}")
            ds.save_as(path, enforce_file_format=True)
            manifest.append({
                "file": path,
                "sample": name,
                "study": study,
                "series": series,
                "sop": sop,
                "sop_class": str(ds.SOPClassUID),
                "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
                "modality": str(ds.get("Modality", "OT")),
                "patient": patient,
                "instance": int(ds.get("InstanceNumber", 0) or 0),
                "study_date": str(ds.get("StudyDate", "")),
            })
    json.dump(manifest, sys.stdout)


if __name__ == "__main__":
    main()
