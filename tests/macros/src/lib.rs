//! `#[meshd_tests::test]` (re-exported by `meshd-tests`): a multi-process test with an overall
//! deadline.
//!
//! ```ignore
//! #[meshd_tests::test]            // the default limit
//! #[meshd_tests::test(limit = 420)] // seconds
//! async fn kill_the_relay() -> anyhow::Result<()> { … }
//! ```
//!
//! The function becomes a `#[tokio::test]` (multi-threaded, two workers) whose body runs under
//! `meshd_tests::deadline::run`: past the limit the test fails with the log tails of every node
//! it started, and its nodes are killed, instead of hanging the whole run. Written on
//! `proc_macro` alone (no syn): it only renames the function and wraps it.

use proc_macro::{Delimiter, Group, Ident, Span, TokenStream, TokenTree};

/// Seconds a test may run when its attribute names no limit.
const DEFAULT_LIMIT_SECS: u64 = 300;

#[proc_macro_attribute]
pub fn test(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr, item) {
        Ok(tokens) => tokens,
        Err(message) => format!("compile_error!({message:?});")
            .parse()
            .expect("a compile_error! call parses"),
    }
}

fn expand(attr: TokenStream, item: TokenStream) -> Result<TokenStream, String> {
    let limit = parse_limit(attr)?;
    let tokens: Vec<TokenTree> = item.into_iter().collect();
    // Leading attributes (`#[ignore]`, doc comments) stay on the test function.
    let mut first = 0;
    while let (Some(TokenTree::Punct(p)), Some(TokenTree::Group(g))) =
        (tokens.get(first), tokens.get(first + 1))
    {
        if p.as_char() != '#' || g.delimiter() != Delimiter::Bracket {
            break;
        }
        first += 2;
    }
    let (outer_attrs, signature) = tokens.split_at(first);
    let fn_at = signature
        .iter()
        .position(|t| matches!(t, TokenTree::Ident(i) if i.to_string() == "fn"))
        .ok_or("#[meshd_tests::test] goes on an `async fn`")?;
    if !signature[..fn_at]
        .iter()
        .any(|t| matches!(t, TokenTree::Ident(i) if i.to_string() == "async"))
    {
        return Err("#[meshd_tests::test] goes on an `async fn`".into());
    }
    let Some(TokenTree::Ident(name)) = signature.get(fn_at + 1) else {
        return Err("#[meshd_tests::test]: expected the function's name after `fn`".into());
    };
    let Some((TokenTree::Group(body), head)) = signature.split_last() else {
        return Err("#[meshd_tests::test]: expected the function's body".into());
    };
    if body.delimiter() != Delimiter::Brace {
        return Err("#[meshd_tests::test]: expected the function's body".into());
    }
    // `-> Ret` (or nothing), shared by the test and the inner function.
    let output: TokenStream = head[fn_at + 2..].iter().skip(1).cloned().collect();
    let params = head
        .get(fn_at + 2)
        .ok_or("#[meshd_tests::test]: expected `()` after the name")?;
    if !matches!(params, TokenTree::Group(g) if g.delimiter() == Delimiter::Parenthesis && g.stream().is_empty())
    {
        return Err("#[meshd_tests::test]: a test takes no arguments".into());
    }

    let inner = Ident::new("__meshd_test_body", Span::call_site());
    let mut out = TokenStream::new();
    out.extend(outer_attrs.iter().cloned());
    out.extend(
        "#[::tokio::test(flavor = \"multi_thread\", worker_threads = 2)]"
            .parse::<TokenStream>()
            .expect("tokio::test attribute parses"),
    );
    // `async fn name() -> Ret { async fn inner() -> Ret BODY  run(...).await }`
    out.extend(head[..fn_at + 3].iter().cloned());
    out.extend(output.clone());
    let mut wrapper = TokenStream::new();
    wrapper.extend([
        TokenTree::Ident(Ident::new("async", Span::call_site())),
        TokenTree::Ident(Ident::new("fn", Span::call_site())),
        TokenTree::Ident(inner.clone()),
        TokenTree::Group(Group::new(Delimiter::Parenthesis, TokenStream::new())),
    ]);
    wrapper.extend(output);
    wrapper.extend([TokenTree::Group(body.clone())]);
    let call = format!(
        "::meshd_tests::deadline::run({:?}, ::std::time::Duration::from_secs({limit}), {inner}()).await",
        name.to_string()
    );
    wrapper.extend(call.parse::<TokenStream>().map_err(|e| e.to_string())?);
    out.extend([TokenTree::Group(Group::new(Delimiter::Brace, wrapper))]);
    Ok(out)
}

/// `limit = N` (seconds), or nothing.
fn parse_limit(attr: TokenStream) -> Result<u64, String> {
    let tokens: Vec<TokenTree> = attr.into_iter().collect();
    match tokens.as_slice() {
        [] => Ok(DEFAULT_LIMIT_SECS),
        [
            TokenTree::Ident(key),
            TokenTree::Punct(eq),
            TokenTree::Literal(value),
        ] if key.to_string() == "limit" && eq.as_char() == '=' => value
            .to_string()
            .parse::<u64>()
            .ok()
            .filter(|&secs| secs > 0)
            .ok_or_else(|| format!("limit must be a positive number of seconds, not {value}")),
        _ => Err("#[meshd_tests::test] takes `limit = SECONDS` or nothing".into()),
    }
}
