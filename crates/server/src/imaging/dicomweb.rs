//! DICOMweb (PS3.18) under `/dicomweb`: STOW-RS (`POST /studies`,
//! `multipart/related; type="application/dicom"`), QIDO-RS (`GET /studies`,
//! `/series`, `/instances`, and nested under a study or series) answering
//! DICOM JSON, WADO-RS (instances as `multipart/related`, `metadata` as
//! DICOM JSON) and each analysed series' rendered `thumbnail` (PNG).
//!
//! Who: STOW-RS for `interface`, `site-user` (its own site's subjects),
//! `data-manager` and `admin`; reads for `site-user` (own site),
//! `monitor`, `data-manager` and `admin`; quarantined studies are seen by
//! `data-manager` and `admin` only. A study out of the caller's scope is a
//! 404, as if absent.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use clinflow_store::{DicomQuery, StoredInstance, StudyRecord};
use futures::StreamExt;
use serde_json::{json, Value};

use super::intake::{Input, Sender, Session};
use super::{dicom_of, meta_of, Imaging};
use crate::auth::{Caller, Role};
use crate::error::ApiError;
use crate::state::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dicomweb/studies", post(stow).get(qido_studies))
        .route("/dicomweb/studies/{study}", post(stow_into).get(wado_study))
        .route("/dicomweb/studies/{study}/metadata", get(study_metadata))
        .route("/dicomweb/studies/{study}/series", get(qido_study_series))
        .route(
            "/dicomweb/studies/{study}/instances",
            get(qido_study_instances),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}",
            get(wado_series),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/metadata",
            get(series_metadata),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/thumbnail",
            get(thumbnail),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances",
            get(qido_series_instances),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances/{sop}",
            get(wado_instance),
        )
        .route(
            "/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata",
            get(instance_metadata),
        )
        .route("/dicomweb/series", get(qido_all_series))
        .route("/dicomweb/instances", get(qido_all_instances))
}

const DICOM_JSON: &str = "application/dicom+json";
/// Results per QIDO-RS answer unless `limit` says fewer.
const QIDO_LIMIT: usize = 100;
const QIDO_MAX: usize = 1000;

/// What a caller may read.
struct Reader {
    /// `None`: every site.
    sites: Option<Vec<String>>,
    quarantine: bool,
}

fn reader(caller: &Caller) -> Result<Reader, ApiError> {
    let p = &caller.principal;
    match p.role {
        Role::Admin | Role::DataManager => Ok(Reader {
            sites: None,
            quarantine: true,
        }),
        Role::Monitor => Ok(Reader {
            sites: None,
            quarantine: false,
        }),
        Role::SiteUser => Ok(Reader {
            sites: Some(p.site.iter().cloned().collect()),
            quarantine: false,
        }),
        Role::Patient | Role::Interface => Err(ApiError::Forbidden(
            "this role may not read imaging studies".into(),
        )),
    }
}

fn imaging(state: &AppState) -> &Arc<Imaging> {
    &state.imaging
}

/// The base URL of the DICOMweb service, from the request's Host.
fn base(headers: &HeaderMap) -> String {
    let fhir = crate::fhir::base_url(headers);
    format!("{}/dicomweb", fhir.trim_end_matches("/fhir"))
}

fn dicom_json(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, HeaderValue::from_static(DICOM_JSON))],
        body.to_string(),
    )
        .into_response()
}

// ---- STOW-RS ----

async fn stow(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    store_parts(state, caller, headers, body, None).await
}

async fn stow_into(
    State(state): State<AppState>,
    caller: Caller,
    Path(study): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    store_parts(state, caller, headers, body, Some(study)).await
}

/// The boundary of a `multipart/related; type="application/dicom"` body.
fn stow_boundary(headers: &HeaderMap) -> Result<String, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime: mime::Mime = ct.parse().map_err(|_| {
        ApiError::UnsupportedMediaType(
            "STOW-RS takes multipart/related; type=\"application/dicom\"".into(),
        )
    })?;
    if mime.type_() != mime::MULTIPART || mime.subtype().as_str() != "related" {
        return Err(ApiError::UnsupportedMediaType(
            "STOW-RS takes multipart/related; type=\"application/dicom\"".into(),
        ));
    }
    match mime
        .get_param("type")
        .map(|t| t.as_str().to_ascii_lowercase())
    {
        Some(t) if t == "application/dicom" => {}
        Some(t) => {
            return Err(ApiError::UnsupportedMediaType(format!(
                "parts of type {t} are not supported: send Part 10 files as application/dicom"
            )))
        }
        None => {
            return Err(ApiError::UnsupportedMediaType(
                "the multipart/related type parameter is missing (type=\"application/dicom\")"
                    .into(),
            ))
        }
    }
    mime.get_param(mime::BOUNDARY)
        .map(|b| b.as_str().to_string())
        .ok_or_else(|| ApiError::BadRequest("the multipart boundary is missing".into()))
}

async fn store_parts(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
    study: Option<String>,
) -> Result<Response, ApiError> {
    let p = &caller.principal;
    let site_only = match p.role {
        Role::Admin | Role::DataManager | Role::Interface => None,
        Role::SiteUser => Some(p.site.clone().unwrap_or_default()),
        Role::Monitor | Role::Patient => {
            return Err(ApiError::Forbidden(
                "this role may not store imaging studies".into(),
            ))
        }
    };
    if let Some(s) = &study {
        if !super::intake::valid_uid(s) {
            return Err(ApiError::BadRequest(
                "the study UID is not a valid UID".into(),
            ));
        }
    }
    let boundary = stow_boundary(&headers)?;
    let im = imaging(&state).clone();
    let limits = multer::Constraints::new().size_limit(
        multer::SizeLimit::new()
            .whole_stream(im.config.stow_max_bytes)
            .per_field(im.config.max_instance_bytes as u64),
    );
    let mut parts = multer::Multipart::with_constraints(body.into_data_stream(), boundary, limits);
    let sender = Sender {
        actor: p.name.clone(),
        role: p.role.as_str().to_string(),
        client: caller.client.clone(),
        source: "stow",
        site_only,
        study: study.clone(),
    };
    let mut session = Session::default();
    let (mut stored, mut failed) = (Vec::new(), Vec::new());
    let base = base(&headers);
    let mut read_error = None;
    loop {
        let field = match parts.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                read_error = Some(e);
                break;
            }
        };
        if let Some(ct) = field.content_type() {
            if ct.essence_str() != "application/dicom" {
                failed.push(failure_item(
                    None,
                    0xC000,
                    &format!("a part of type {ct} is not application/dicom"),
                ));
                continue;
            }
        }
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) => {
                read_error = Some(e);
                break;
            }
        };
        match im
            .accept(Input::Part10(bytes.to_vec()), &sender, &mut session)
            .await
        {
            Ok(s) => {
                if s.duplicate {
                    im.metrics.received("stow", "duplicate");
                }
                stored.push(json!({
                    "00081150": {"vr": "UI", "Value": [s.sop_class_uid]},
                    "00081155": {"vr": "UI", "Value": [s.sop_instance_uid]},
                    "00081190": {"vr": "UR", "Value": [format!("{base}/studies/{}/series/{}/instances/{}", s.study_uid, s.series_uid, s.sop_instance_uid)]},
                }));
            }
            Err(r) => {
                im.metrics.received("stow", r.kind());
                failed.push(failure_item(None, r.status(), &r.comment()));
            }
        }
    }
    let any_stored = !stored.is_empty();
    im.finish_session(session).await;
    if let Some(e) = read_error {
        let detail = format!(
            "the multipart body could not be read ({e}); {} instance(s) before it were stored",
            stored.len()
        );
        return Err(match e {
            multer::Error::StreamSizeExceeded { .. } | multer::Error::FieldSizeExceeded { .. } => {
                ApiError::PayloadTooLarge(im.config.max_instance_bytes)
            }
            _ => ApiError::BadRequest(detail),
        });
    }
    if stored.is_empty() && failed.is_empty() {
        return Err(ApiError::BadRequest("the request holds no instance".into()));
    }
    let mut answer = serde_json::Map::new();
    if let Some(s) = &study {
        answer.insert(
            "00081190".into(),
            json!({"vr": "UR", "Value": [format!("{base}/studies/{s}")]}),
        );
    }
    if !failed.is_empty() {
        answer.insert("00081198".into(), json!({"vr": "SQ", "Value": failed}));
    }
    if any_stored {
        answer.insert("00081199".into(), json!({"vr": "SQ", "Value": stored}));
    }
    let status = match (any_stored, answer.contains_key("00081198")) {
        (true, false) => StatusCode::OK,
        (true, true) => StatusCode::ACCEPTED,
        (false, _) => StatusCode::CONFLICT,
    };
    Ok(dicom_json(status, &Value::Object(answer)))
}

/// A Failed SOP Sequence item: the Failure Reason, and the reason in
/// words as an Error Comment (0000,0902).
fn failure_item(sop: Option<(&str, &str)>, reason: u16, comment: &str) -> Value {
    let mut item = json!({
        "00081197": {"vr": "US", "Value": [reason]},
        "00000902": {"vr": "LO", "Value": [comment.chars().take(1024).collect::<String>()]},
    });
    if let Some((class, instance)) = sop {
        item["00081150"] = json!({"vr": "UI", "Value": [class]});
        item["00081155"] = json!({"vr": "UI", "Value": [instance]});
    }
    item
}

// ---- QIDO-RS ----

/// The matching keys QIDO-RS supports here, by keyword or tag.
#[derive(Default)]
struct Matching {
    query: DicomQuery,
    modality: Option<String>,
    series_uid: Option<String>,
    sop_uid: Option<String>,
}

fn parse_matching(raw: Option<&str>, reader: &Reader) -> Result<Matching, ApiError> {
    let mut m = Matching::default();
    m.query.limit = QIDO_LIMIT;
    m.query.sites = reader.sites.clone();
    m.query.include_quarantined = reader.quarantine;
    for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        let v = v.trim().to_string();
        match k.as_ref() {
            "PatientID" | "00100020" => m.query.patient_id = Some(v),
            "StudyInstanceUID" | "0020000D" => m.query.study_uid = Some(v),
            "AccessionNumber" | "00080050" => m.query.accession = Some(v),
            "ModalitiesInStudy" | "00080061" | "Modality" | "00080060" => m.modality = Some(v),
            "SeriesInstanceUID" | "0020000E" => m.series_uid = Some(v),
            "SOPInstanceUID" | "00080018" => m.sop_uid = Some(v),
            "StudyDate" | "00080020" => {
                let (from, to) = date_range(&v).ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "StudyDate {v:?} is not YYYYMMDD or a range YYYYMMDD-YYYYMMDD"
                    ))
                })?;
                m.query.date_from = from;
                m.query.date_to = to;
            }
            "limit" => {
                m.query.limit = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::BadRequest("limit is a number".into()))?
                    .clamp(1, QIDO_MAX)
            }
            "offset" => {
                m.query.offset = v
                    .parse()
                    .map_err(|_| ApiError::BadRequest("offset is a number".into()))?
            }
            "includefield" | "fuzzymatching" => {}
            "includequarantined" => {
                m.query.include_quarantined = reader.quarantine && v == "true";
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "{other} is not a supported matching key (PatientID, StudyDate, \
                     ModalitiesInStudy, StudyInstanceUID, AccessionNumber, SeriesInstanceUID, \
                     SOPInstanceUID, limit, offset)"
                )))
            }
        }
    }
    Ok(m)
}

/// `YYYYMMDD`, `YYYYMMDD-YYYYMMDD`, `-YYYYMMDD` or `YYYYMMDD-`.
fn date_range(v: &str) -> Option<(Option<String>, Option<String>)> {
    let date = |s: &str| -> Option<Option<String>> {
        if s.is_empty() {
            return Some(None);
        }
        (s.len() == 8 && s.bytes().all(|b| b.is_ascii_digit())).then(|| Some(s.to_string()))
    };
    match v.split_once('-') {
        None => {
            let d = date(v)??;
            Some((Some(d.clone()), Some(d)))
        }
        Some((a, b)) => {
            let (a, b) = (date(a)?, date(b)?);
            (a.is_some() || b.is_some()).then_some((a, b))
        }
    }
}

/// A study's instances, grouped by series.
fn series_of(rows: &[StoredInstance]) -> Vec<(String, Vec<&StoredInstance>)> {
    let mut out: Vec<(String, Vec<&StoredInstance>)> = Vec::new();
    for r in rows {
        match out.last_mut() {
            Some((s, list)) if *s == r.series_uid => list.push(r),
            _ => out.push((r.series_uid.clone(), vec![r])),
        }
    }
    out
}

async fn qido_studies(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let reader = reader(&caller)?;
    let m = parse_matching(raw.as_deref(), &reader)?;
    let im = imaging(&state);
    let studies = im.store().dicom_studies(m.query.clone()).await?;
    let base = base(&headers);
    let mut out = Vec::new();
    for s in &studies {
        let rows = im.store().study_instances(&s.study_uid).await?;
        let summary = study_summary(s, &rows)?;
        if let Some(want) = &m.modality {
            if !summary.modalities.iter().any(|x| x == want) {
                continue;
            }
        }
        out.push(clinflow_imaging::qido_study(&summary, &base));
    }
    audit_read(&state, &caller, "dicom-search", None, out.len()).await;
    Ok(dicom_json(StatusCode::OK, &Value::Array(out)))
}

fn study_summary(
    s: &StudyRecord,
    rows: &[StoredInstance],
) -> Result<clinflow_imaging::StudySummary, ApiError> {
    let first = rows.first().map(|r| meta_of(&r.attrs)).transpose()?;
    let mut modalities: Vec<String> = Vec::new();
    for r in rows {
        let meta = meta_of(&r.attrs)?;
        if !modalities.contains(&meta.modality) {
            modalities.push(meta.modality);
        }
    }
    modalities.sort();
    Ok(clinflow_imaging::StudySummary {
        study_uid: s.study_uid.clone(),
        patient_id: s.patient_id.clone(),
        study_date: s.study_date.clone(),
        study_time: first.as_ref().and_then(|m| m.study_time.clone()),
        accession: s.accession.clone(),
        study_description: first.as_ref().and_then(|m| m.study_description.clone()),
        modalities,
        series_count: series_of(rows).len() as u32,
        instance_count: rows.len() as u32,
    })
}

/// The studies a query at series or instance level looks into.
async fn studies_for(state: &AppState, m: &Matching) -> Result<Vec<StudyRecord>, ApiError> {
    Ok(imaging(state)
        .store()
        .dicom_studies(m.query.clone())
        .await?)
}

/// The study if it is in the caller's scope (else 404, as if absent).
async fn scoped_study(
    state: &AppState,
    caller: &Caller,
    study: &str,
) -> Result<StudyRecord, ApiError> {
    let reader = reader(caller)?;
    let q = DicomQuery {
        study_uid: Some(study.to_string()),
        sites: reader.sites,
        include_quarantined: reader.quarantine,
        limit: 1,
        ..Default::default()
    };
    imaging(state)
        .store()
        .dicom_studies(q)
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::NotFound("no such study".into()))
}

async fn series_answer(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    studies: Vec<StudyRecord>,
    m: &Matching,
) -> Result<Response, ApiError> {
    let base = base(headers);
    let mut out = Vec::new();
    for s in &studies {
        let rows = imaging(state).store().study_instances(&s.study_uid).await?;
        for (series, list) in series_of(&rows) {
            if m.series_uid.as_ref().is_some_and(|w| *w != series) {
                continue;
            }
            let meta = meta_of(&list[0].attrs)?;
            if m.modality.as_ref().is_some_and(|w| *w != meta.modality) {
                continue;
            }
            let summary = clinflow_imaging::SeriesSummary {
                study_uid: s.study_uid.clone(),
                series_uid: series.clone(),
                modality: meta.modality.clone(),
                series_number: meta.series_number,
                series_description: meta.series_description.clone(),
                instance_count: list.len() as u32,
            };
            out.push(clinflow_imaging::qido_series(&summary, &base));
        }
    }
    audit_read(state, caller, "dicom-search", None, out.len()).await;
    Ok(dicom_json(StatusCode::OK, &Value::Array(out)))
}

async fn instances_answer(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    studies: Vec<StudyRecord>,
    m: &Matching,
) -> Result<Response, ApiError> {
    let base = base(headers);
    let mut out = Vec::new();
    for s in &studies {
        for r in imaging(state).store().study_instances(&s.study_uid).await? {
            if m.series_uid.as_ref().is_some_and(|w| *w != r.series_uid)
                || m.sop_uid.as_ref().is_some_and(|w| *w != r.sop_instance_uid)
            {
                continue;
            }
            let meta = meta_of(&r.attrs)?;
            if m.modality.as_ref().is_some_and(|w| *w != meta.modality) {
                continue;
            }
            out.push(clinflow_imaging::qido_instance(&meta, &base));
            if out.len() >= m.query.limit {
                break;
            }
        }
    }
    audit_read(state, caller, "dicom-search", None, out.len()).await;
    Ok(dicom_json(StatusCode::OK, &Value::Array(out)))
}

async fn qido_all_series(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let m = parse_matching(raw.as_deref(), &reader(&caller)?)?;
    let studies = studies_for(&state, &m).await?;
    series_answer(&state, &caller, &headers, studies, &m).await
}

async fn qido_study_series(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let m = parse_matching(raw.as_deref(), &reader(&caller)?)?;
    let s = scoped_study(&state, &caller, &study).await?;
    series_answer(&state, &caller, &headers, vec![s], &m).await
}

async fn qido_all_instances(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let m = parse_matching(raw.as_deref(), &reader(&caller)?)?;
    let studies = studies_for(&state, &m).await?;
    instances_answer(&state, &caller, &headers, studies, &m).await
}

async fn qido_study_instances(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let m = parse_matching(raw.as_deref(), &reader(&caller)?)?;
    let s = scoped_study(&state, &caller, &study).await?;
    instances_answer(&state, &caller, &headers, vec![s], &m).await
}

async fn qido_series_instances(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut m = parse_matching(raw.as_deref(), &reader(&caller)?)?;
    m.series_uid = Some(series);
    let s = scoped_study(&state, &caller, &study).await?;
    instances_answer(&state, &caller, &headers, vec![s], &m).await
}

// ---- WADO-RS ----

/// The instances of a study (optionally one series, one instance) in the
/// caller's scope; 404 when none.
async fn scoped_instances(
    state: &AppState,
    caller: &Caller,
    study: &str,
    series: Option<&str>,
    sop: Option<&str>,
) -> Result<Vec<StoredInstance>, ApiError> {
    scoped_study(state, caller, study).await?;
    let rows: Vec<StoredInstance> = imaging(state)
        .store()
        .study_instances(study)
        .await?
        .into_iter()
        .filter(|r| series.is_none_or(|s| r.series_uid == s))
        .filter(|r| sop.is_none_or(|s| r.sop_instance_uid == s))
        .collect();
    if rows.is_empty() {
        return Err(ApiError::NotFound("no such series or instance".into()));
    }
    Ok(rows)
}

/// The `Accept` allows `multipart/related; type="application/dicom"`.
fn accepts_dicom(headers: &HeaderMap) -> Result<(), ApiError> {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("*/*")
        .to_ascii_lowercase();
    let ok = accept.split(',').any(|a| {
        let a = a.trim();
        a.starts_with("*/*")
            || a.starts_with("multipart/*")
            || (a.starts_with("multipart/related")
                && (!a.contains("type=")
                    || a.contains("application/dicom\"")
                    || a.contains("type=application/dicom")))
            || a.starts_with("application/dicom")
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::NotAcceptable(
            "instances are served as multipart/related; type=\"application/dicom\"".into(),
        ))
    }
}

fn multipart(state: &AppState, rows: Vec<StoredInstance>) -> Response {
    let boundary = format!("clinflow-{}", uuid::Uuid::new_v4().simple());
    let content_type = HeaderValue::from_str(&format!(
        "multipart/related; type=\"application/dicom\"; boundary={boundary}"
    ))
    .unwrap_or(HeaderValue::from_static("multipart/related"));
    let files = imaging(state).files.clone();
    let b = boundary.clone();
    let parts = futures::stream::iter(rows).then(move |r| {
        let (files, b) = (files.clone(), b.clone());
        async move {
            let bytes = tokio::fs::read(files.path_of(&r.path)).await?;
            let mut part = format!(
                "--{b}\r\nContent-Type: application/dicom\r\nContent-Length: {}\r\n\r\n",
                bytes.len()
            )
            .into_bytes();
            part.extend_from_slice(&bytes);
            part.extend_from_slice(b"\r\n");
            Ok::<_, std::io::Error>(Bytes::from(part))
        }
    });
    let end = futures::stream::once(async move {
        Ok::<_, std::io::Error>(Bytes::from(format!("--{boundary}--\r\n")))
    });
    let body = Body::from_stream(parts.chain(end));
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn retrieve(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    study: String,
    series: Option<String>,
    sop: Option<String>,
) -> Result<Response, ApiError> {
    accepts_dicom(&headers)?;
    let rows = scoped_instances(&state, &caller, &study, series.as_deref(), sop.as_deref()).await?;
    audit_read(&state, &caller, "dicom-retrieve", Some(&study), rows.len()).await;
    Ok(multipart(&state, rows))
}

async fn wado_study(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path(study): Path<String>,
) -> Result<Response, ApiError> {
    retrieve(state, caller, headers, study, None, None).await
}

async fn wado_series(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    retrieve(state, caller, headers, study, Some(series), None).await
}

async fn wado_instance(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Path((study, series, sop)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    retrieve(state, caller, headers, study, Some(series), Some(sop)).await
}

async fn metadata(
    state: AppState,
    caller: Caller,
    study: String,
    series: Option<String>,
    sop: Option<String>,
) -> Result<Response, ApiError> {
    let rows = scoped_instances(&state, &caller, &study, series.as_deref(), sop.as_deref()).await?;
    let list = rows
        .iter()
        .map(|r| dicom_of(&r.attrs))
        .collect::<anyhow::Result<Vec<_>>>()?;
    audit_read(&state, &caller, "dicom-metadata", Some(&study), list.len()).await;
    Ok(dicom_json(StatusCode::OK, &Value::Array(list)))
}

async fn study_metadata(
    State(state): State<AppState>,
    caller: Caller,
    Path(study): Path<String>,
) -> Result<Response, ApiError> {
    metadata(state, caller, study, None, None).await
}

async fn series_metadata(
    State(state): State<AppState>,
    caller: Caller,
    Path((study, series)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    metadata(state, caller, study, Some(series), None).await
}

async fn instance_metadata(
    State(state): State<AppState>,
    caller: Caller,
    Path((study, series, sop)): Path<(String, String, String)>,
) -> Result<Response, ApiError> {
    metadata(state, caller, study, Some(series), Some(sop)).await
}

/// The analysed series' thumbnail (PNG, longest side 128 px).
async fn thumbnail(
    State(state): State<AppState>,
    caller: Caller,
    Path((study, series)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    scoped_instances(&state, &caller, &study, Some(&series), None).await?;
    let path = imaging(&state).files.thumbnail_path(&series);
    let png = match tokio::fs::read(&path).await {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ApiError::NotFound(
                "the series has not been analysed yet: its thumbnail comes with its analysis"
                    .into(),
            ))
        }
        Err(e) => return Err(ApiError::Internal(e.into())),
    };
    audit_read(&state, &caller, "dicom-thumbnail", Some(&study), 1).await;
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("image/png")),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("private, no-cache"),
            ),
        ],
        png,
    )
        .into_response())
}

/// Read-audits an imaging read (queued; commits with the next group).
async fn audit_read(
    state: &AppState,
    caller: &Caller,
    action: &str,
    study: Option<&str>,
    count: usize,
) {
    let mut rec = caller.audit(action, "success");
    rec.resource_type = Some("ImagingStudy".into());
    rec.resource_id = study.map(clinflow_imaging::imaging_study_id);
    rec.detail = Some(format!("results={count}"));
    if let Err(e) = state.store.audit(vec![rec]).await {
        tracing::warn!(error = %e, "queueing a read audit record failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn study_dates_are_single_days_or_ranges() {
        let d = |s: &str| Some(s.to_string());
        assert_eq!(date_range("20260102"), Some((d("20260102"), d("20260102"))));
        assert_eq!(
            date_range("20260102-20260301"),
            Some((d("20260102"), d("20260301")))
        );
        assert_eq!(date_range("-20260301"), Some((None, d("20260301"))));
        assert_eq!(date_range("20260102-"), Some((d("20260102"), None)));
        assert_eq!(date_range("-"), None);
        assert_eq!(date_range("2026-01-02"), None);
        assert_eq!(date_range("2026010"), None);
    }

    #[test]
    fn stow_takes_multipart_related_of_application_dicom_only() {
        let h = |ct: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
            m
        };
        assert_eq!(
            stow_boundary(&h(
                "multipart/related; type=\"application/dicom\"; boundary=abc"
            ))
            .unwrap(),
            "abc"
        );
        for bad in [
            "application/dicom",
            "multipart/form-data; boundary=abc",
            "multipart/related; boundary=abc",
            "multipart/related; type=\"application/dicom+json\"; boundary=abc",
        ] {
            assert!(stow_boundary(&h(bad)).is_err(), "{bad}");
        }
        assert!(matches!(
            stow_boundary(&h("multipart/related; type=\"application/dicom\"")),
            Err(ApiError::BadRequest(_))
        ));
    }
}
