//! DIMSE command sets (PS3.7 §9.3, §E): decoding C-ECHO-RQ / C-STORE-RQ and
//! encoding their responses.
//!
//! A command set is always group 0000 in implicit VR little endian, whatever transfer
//! syntax the presentation context negotiated, so this module is a small hand-written
//! codec with no I/O; it never panics on malformed input.

use thiserror::Error;

/// CommandField (0000,0100) values this provider understands.
pub mod field {
    /// C-STORE-RQ.
    pub const C_STORE_RQ: u16 = 0x0001;
    /// C-STORE-RSP.
    pub const C_STORE_RSP: u16 = 0x8001;
    /// C-ECHO-RQ.
    pub const C_ECHO_RQ: u16 = 0x0030;
    /// C-ECHO-RSP.
    pub const C_ECHO_RSP: u16 = 0x8030;
}

/// CommandDataSetType (0000,0800) value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;

const TAG_GROUP_LENGTH: u16 = 0x0000;
const TAG_AFFECTED_SOP_CLASS: u16 = 0x0002;
const TAG_COMMAND_FIELD: u16 = 0x0100;
const TAG_MESSAGE_ID: u16 = 0x0110;
const TAG_MESSAGE_ID_RESPONDED: u16 = 0x0120;
const TAG_DATA_SET_TYPE: u16 = 0x0800;
const TAG_STATUS: u16 = 0x0900;
const TAG_ERROR_COMMENT: u16 = 0x0902;
const TAG_AFFECTED_SOP_INSTANCE: u16 = 0x1000;

/// The maximum length of an ErrorComment (LO, 64 characters).
const ERROR_COMMENT_MAX: usize = 64;

/// Why a command set could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum CommandError {
    /// An element header or value runs past the end of the command set.
    #[error("command set truncated")]
    Truncated,
    /// An element outside group 0000, or with undefined length.
    #[error("command set holds an invalid element ({group:04X},{element:04X})")]
    InvalidElement {
        /// Group number of the offending element.
        group: u16,
        /// Element number of the offending element.
        element: u16,
    },
    /// A US element whose value is not two bytes.
    #[error("element (0000,{0:04X}) has a bad length")]
    BadLength(u16),
    /// CommandField (0000,0100) is absent.
    #[error("command set has no CommandField")]
    MissingCommandField,
}

/// The fields of a request command set that this provider uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    /// CommandField (0000,0100).
    pub command_field: u16,
    /// MessageID (0000,0110); 0 when absent.
    pub message_id: u16,
    /// AffectedSOPClassUID (0000,0002), trimmed of padding.
    pub affected_sop_class_uid: Option<String>,
    /// AffectedSOPInstanceUID (0000,1000), trimmed of padding.
    pub affected_sop_instance_uid: Option<String>,
    /// CommandDataSetType (0000,0800); [`NO_DATA_SET`] when absent.
    pub data_set_type: u16,
}

impl Command {
    /// Whether a data set follows this command.
    pub fn has_data_set(&self) -> bool {
        self.data_set_type != NO_DATA_SET
    }

    /// Decode a command set (implicit VR little endian).
    pub fn decode(mut bytes: &[u8]) -> Result<Self, CommandError> {
        let mut cmd = Command {
            data_set_type: NO_DATA_SET,
            ..Command::default()
        };
        let mut saw_field = false;
        while !bytes.is_empty() {
            if bytes.len() < 8 {
                return Err(CommandError::Truncated);
            }
            let group = u16::from_le_bytes([bytes[0], bytes[1]]);
            let element = u16::from_le_bytes([bytes[2], bytes[3]]);
            let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
            if group != 0 || len == u32::MAX {
                return Err(CommandError::InvalidElement { group, element });
            }
            let len = len as usize;
            let rest = &bytes[8..];
            if rest.len() < len {
                return Err(CommandError::Truncated);
            }
            let value = &rest[..len];
            bytes = &rest[len..];
            match element {
                TAG_AFFECTED_SOP_CLASS => cmd.affected_sop_class_uid = Some(text(value)),
                TAG_AFFECTED_SOP_INSTANCE => cmd.affected_sop_instance_uid = Some(text(value)),
                TAG_COMMAND_FIELD => {
                    cmd.command_field = us(element, value)?;
                    saw_field = true;
                }
                TAG_MESSAGE_ID => cmd.message_id = us(element, value)?,
                TAG_DATA_SET_TYPE => cmd.data_set_type = us(element, value)?,
                _ => {}
            }
        }
        if !saw_field {
            return Err(CommandError::MissingCommandField);
        }
        Ok(cmd)
    }
}

fn us(element: u16, value: &[u8]) -> Result<u16, CommandError> {
    match value {
        [a, b] => Ok(u16::from_le_bytes([*a, *b])),
        _ => Err(CommandError::BadLength(element)),
    }
}

fn text(value: &[u8]) -> String {
    String::from_utf8_lossy(value)
        .trim_end_matches(['\0', ' '])
        .trim_start()
        .to_owned()
}

/// A response command set to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response<'a> {
    /// CommandField of the response ([`field::C_ECHO_RSP`] or [`field::C_STORE_RSP`]).
    pub command_field: u16,
    /// MessageID of the request answered.
    pub message_id_responded: u16,
    /// AffectedSOPClassUID, echoed from the request.
    pub affected_sop_class_uid: Option<&'a str>,
    /// AffectedSOPInstanceUID, echoed from the request.
    pub affected_sop_instance_uid: Option<&'a str>,
    /// Status (0000,0900).
    pub status: u16,
    /// ErrorComment (0000,0902), truncated to 64 characters.
    pub error_comment: Option<&'a str>,
}

impl Response<'_> {
    /// Encode as implicit VR little endian, with CommandGroupLength first.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(160);
        if let Some(uid) = self.affected_sop_class_uid {
            put(
                &mut body,
                TAG_AFFECTED_SOP_CLASS,
                &padded(uid.as_bytes(), 0),
            );
        }
        put(
            &mut body,
            TAG_COMMAND_FIELD,
            &self.command_field.to_le_bytes(),
        );
        put(
            &mut body,
            TAG_MESSAGE_ID_RESPONDED,
            &self.message_id_responded.to_le_bytes(),
        );
        put(&mut body, TAG_DATA_SET_TYPE, &NO_DATA_SET.to_le_bytes());
        put(&mut body, TAG_STATUS, &self.status.to_le_bytes());
        if let Some(comment) = self.error_comment {
            // LO: default character repertoire, no backslash, at most 64 characters.
            let clean: String = comment
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() && c != '\\' {
                        c
                    } else {
                        ' '
                    }
                })
                .take(ERROR_COMMENT_MAX)
                .collect();
            put(
                &mut body,
                TAG_ERROR_COMMENT,
                &padded(clean.as_bytes(), b' '),
            );
        }
        if let Some(uid) = self.affected_sop_instance_uid {
            put(
                &mut body,
                TAG_AFFECTED_SOP_INSTANCE,
                &padded(uid.as_bytes(), 0),
            );
        }
        let mut out = Vec::with_capacity(body.len() + 12);
        put(
            &mut out,
            TAG_GROUP_LENGTH,
            &(body.len() as u32).to_le_bytes(),
        );
        out.extend_from_slice(&body);
        out
    }
}

fn padded(value: &[u8], pad: u8) -> Vec<u8> {
    let mut v = value.to_vec();
    if v.len() % 2 == 1 {
        v.push(pad);
    }
    v
}

fn put(out: &mut Vec<u8>, element: u16, value: &[u8]) {
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&element.to_le_bytes());
    out.extend_from_slice(&(value.len() as u32).to_le_bytes());
    out.extend_from_slice(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(with_data: bool) -> Vec<u8> {
        let mut body = Vec::new();
        put(
            &mut body,
            TAG_AFFECTED_SOP_CLASS,
            b"1.2.840.10008.5.1.4.1.1.2\0",
        );
        put(
            &mut body,
            TAG_COMMAND_FIELD,
            &field::C_STORE_RQ.to_le_bytes(),
        );
        put(&mut body, TAG_MESSAGE_ID, &7u16.to_le_bytes());
        put(&mut body, 0x0700, &0u16.to_le_bytes());
        let dst: u16 = if with_data { 0x0000 } else { NO_DATA_SET };
        put(&mut body, TAG_DATA_SET_TYPE, &dst.to_le_bytes());
        put(&mut body, TAG_AFFECTED_SOP_INSTANCE, b"1.2.3.4 ");
        let mut out = Vec::new();
        put(
            &mut out,
            TAG_GROUP_LENGTH,
            &(body.len() as u32).to_le_bytes(),
        );
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn decodes_store_request() {
        let cmd = Command::decode(&request(true)).unwrap();
        assert_eq!(cmd.command_field, field::C_STORE_RQ);
        assert_eq!(cmd.message_id, 7);
        assert_eq!(
            cmd.affected_sop_class_uid.as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        assert_eq!(cmd.affected_sop_instance_uid.as_deref(), Some("1.2.3.4"));
        assert!(cmd.has_data_set());
        assert!(!Command::decode(&request(false)).unwrap().has_data_set());
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        let full = request(true);
        for cut in 0..full.len() {
            let _ = Command::decode(&full[..cut]);
        }
        assert_eq!(
            Command::decode(&full[..full.len() - 1]),
            Err(CommandError::Truncated)
        );
        assert_eq!(
            Command::decode(&[0x08, 0, 0x10, 0, 0, 0, 0, 0]),
            Err(CommandError::InvalidElement {
                group: 8,
                element: 0x10
            })
        );
        assert_eq!(Command::decode(&[]), Err(CommandError::MissingCommandField));
    }

    #[test]
    fn encodes_response_that_decodes_back() {
        let rsp = Response {
            command_field: field::C_STORE_RSP,
            message_id_responded: 7,
            affected_sop_class_uid: Some("1.2.840.10008.5.1.4.1.1.2"),
            affected_sop_instance_uid: Some("1.2.3"),
            status: 0xA700,
            error_comment: Some("too big\\ever"),
        };
        let bytes = rsp.encode();
        let group_len = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        assert_eq!(group_len as usize, bytes.len() - 12);
        assert!(bytes.len().is_multiple_of(2));
        let back = Command::decode(&bytes).unwrap();
        assert_eq!(back.command_field, field::C_STORE_RSP);
        assert_eq!(back.affected_sop_instance_uid.as_deref(), Some("1.2.3"));
        let comment = b"too big ever";
        assert!(bytes.windows(comment.len()).any(|w| w == comment));
    }
}
