//! The answers anteroom gives on its own when it will not (or cannot) pass a request on, each marked with
//! its [`Rejection`] so that [`Outcome::finish`](super::Outcome::finish) counts it as refused, and why.

use http::header::{HeaderValue, ALLOW, CONNECTION};
use http::StatusCode;

use crate::metrics::Rejection;
use crate::request::{error_response, unavailable, BadHead, Reply};

/// Marks `r` as a refusal for `why`.
pub fn refused(mut r: Reply, why: Rejection) -> Reply {
    r.extensions_mut().insert(why);
    r
}

/// 413: the body is over `--max-body-size`.
pub fn too_large(id: &str, max: u64) -> Reply {
    refused(
        error_response(
            StatusCode::PAYLOAD_TOO_LARGE,
            id,
            &format!("The request body is larger than the limit of {max} bytes."),
        ),
        Rejection::BodyTooLarge,
    )
}

/// 408 for a body that stalled past --body-timeout; the connection closes after it.
pub fn body_timeout(id: &str) -> Reply {
    closing(
        StatusCode::REQUEST_TIMEOUT,
        id,
        "The request body did not arrive in time.",
        Rejection::BodyTimeout,
    )
}

/// A refusal after which the connection closes: what the client sent next cannot be read reliably.
fn closing(status: StatusCode, id: &str, why: &str, reason: Rejection) -> Reply {
    let mut r = error_response(status, id, why);
    r.headers_mut()
        .insert(CONNECTION, HeaderValue::from_static("close"));
    refused(r, reason)
}

/// 400: the request could not be read or understood (`why` says what was wrong).
pub fn bad_request(id: &str, why: &str) -> Reply {
    refused(
        error_response(StatusCode::BAD_REQUEST, id, why),
        Rejection::BadRequest,
    )
}

/// A head that the codec cannot read (400), too large (431), with an unknown transfer coding (501) or of
/// HTTP/2 (505); the connection closes after it.
pub fn bad_syntax(id: &str, why: &crate::http1::HeadError) -> Reply {
    let status = why.status();
    let reason = if status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE {
        Rejection::HeadTooLarge
    } else {
        Rejection::BadRequest
    };
    closing(status, id, &format!("{why}."), reason)
}

/// 408 for a head that did not arrive within --header-timeout; the connection closes after it.
pub fn head_timeout(id: &str) -> Reply {
    closing(
        StatusCode::REQUEST_TIMEOUT,
        id,
        "The request head did not arrive in time.",
        Rejection::HeadTimeout,
    )
}

/// A head that fails [`RequestHead::check`](crate::request::RequestHead::check): 405 with `Allow` for
/// CONNECT (RFC 9110 §15.5.6 asks for `Allow`), else 400. Logged at debug: the client's mistake, not ours.
pub fn bad_head(id: &str, why: &BadHead) -> Reply {
    tracing::debug!("request refused before any worker: {why}");
    if *why == BadHead::Connect {
        let mut r = error_response(StatusCode::METHOD_NOT_ALLOWED, id, &format!("{why}."));
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static(BadHead::ALLOW));
        return refused(r, Rejection::MethodNotAllowed);
    }
    bad_request(id, &format!("{why}."))
}

/// The disk is full (or out of descriptors): the body has nowhere to wait. Logged in the request's span.
pub fn no_temp_file(id: &str, e: &std::io::Error) -> Reply {
    let dir = &crate::spill::settings().dir;
    tracing::warn!(dir = %dir.display(), "cannot write a request body to a temp file: {e}; answered 503");
    refused(
        unavailable(
            id,
            "The server has no room for the request body at the moment.",
            5,
        ),
        Rejection::TempFile,
    )
}
