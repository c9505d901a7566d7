//! An error and its causes as one line, as anyhow's `{:#}` prints them: for typed errors
//! that end up in a log line, a wire `Error` frame or a report, in crates that do not use
//! anyhow.

/// `e`, then each of its sources, joined by `": "`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1.as_deref().map(|l| l as _)
        }
    }

    #[test]
    fn causes_follow_the_error_in_order() {
        let e = Layer(
            "fetch failed",
            Some(Box::new(Layer(
                "GET timed out",
                Some(Box::new(Layer("connection reset", None))),
            ))),
        );
        assert_eq!(
            error_chain(&e),
            "fetch failed: GET timed out: connection reset"
        );
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
