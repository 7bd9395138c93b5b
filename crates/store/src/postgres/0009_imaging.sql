CREATE TABLE dicom_studies (
    study_uid TEXT PRIMARY KEY,
    patient_id TEXT NOT NULL,
    subject TEXT,
    site TEXT,
    quarantine TEXT,
    study_date TEXT,
    accession TEXT,
    attrs TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX dicom_studies_patient ON dicom_studies (patient_id);
CREATE INDEX dicom_studies_date ON dicom_studies (study_date);
CREATE INDEX dicom_studies_accession ON dicom_studies (accession);

CREATE TABLE dicom_series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    series_number BIGINT,
    attrs TEXT NOT NULL,
    instance_count BIGINT NOT NULL
);
CREATE INDEX dicom_series_study ON dicom_series (study_uid);

CREATE TABLE dicom_instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    instance_number BIGINT,
    path TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    attrs TEXT NOT NULL,
    source TEXT NOT NULL,
    received_at BIGINT NOT NULL
);
CREATE INDEX dicom_instances_series ON dicom_instances (series_uid, instance_number);
CREATE INDEX dicom_instances_study ON dicom_instances (study_uid);

CREATE TABLE imaging_tasks (
    id TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed', 'dead')),
    attempts BIGINT NOT NULL,
    max_attempts BIGINT NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_until BIGINT,
    last_error TEXT,
    report_id TEXT,
    dirty BOOLEAN NOT NULL DEFAULT FALSE,
    published BOOLEAN NOT NULL DEFAULT FALSE,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX imaging_tasks_due ON imaging_tasks (status, next_attempt_at);
CREATE INDEX imaging_tasks_lease ON imaging_tasks (status, lease_until);
CREATE INDEX imaging_tasks_unpublished ON imaging_tasks (published, created_at);
