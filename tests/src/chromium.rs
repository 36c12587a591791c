//! Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! commands on its fd 3, answers on its fd 4, each JSON message ended by a NUL byte), so a test
//! loads a page in a real browser, fills a form, reads the rendered DOM and takes a screenshot,
//! with no WebSocket client and no Node.js. The two descriptors are named pipes (FIFOs) that a
//! shell attaches with redirections before it `exec`s Chromium.
//!
//! Every wait is bounded; the browser is killed when [`Chromium`] is dropped.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::time::Instant;

/// The browser binary (Debian's `chromium`, installed by scripts/system-deps.sh).
pub const CHROMIUM: &str = "chromium";

/// Longest any one DevTools command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A headless Chromium with one page attached.
#[derive(Debug)]
pub struct Chromium {
    child: Child,
    commands: std::fs::File,
    answers: mpsc::Receiver<Value>,
    next_id: u64,
    session: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl Chromium {
    /// Starts Chromium with a fresh profile under `dir` and a `width`×`height` window, and
    /// opens a blank page.
    pub fn start(dir: &Path, width: u32, height: u32) -> Result<Self> {
        let which = Command::new("sh").arg("-c").arg(format!("command -v {CHROMIUM}")).output()?;
        if !which.status.success() {
            bail!("`{CHROMIUM}` is not installed: run scripts/system-deps.sh (Debian package `chromium`)");
        }
        std::fs::create_dir_all(dir)?;
        let (to_browser, from_browser) = (dir.join("cdp-in"), dir.join("cdp-out"));
        for fifo in [&to_browser, &from_browser] {
            let _ = std::fs::remove_file(fifo);
            let made = Command::new("mkfifo").arg(fifo).status()?;
            if !made.success() {
                bail!("mkfifo {} failed", fifo.display());
            }
        }
        let log = dir.join("chromium.log");
        let profile = dir.join("profile");
        let flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--remote-debugging-pipe",
        ];
        let script = format!(
            "exec {CHROMIUM} {} --user-data-dir=\"$1\" --window-size={width},{height} about:blank 3<\"$2\" 4>\"$3\"",
            flags.join(" ")
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&profile)
            .arg(&to_browser)
            .arg(&from_browser)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log)?))
            .stderr(Stdio::from(std::fs::OpenOptions::new().append(true).open(&log)?))
            .spawn()
            .context("starting chromium")?;
        // Opening a FIFO blocks until its other end is opened: done on a thread, bounded, so a
        // browser that dies at start fails the test instead of hanging it.
        let (opened_tx, opened_rx) = mpsc::channel();
        let (a, b) = (to_browser.clone(), from_browser.clone());
        std::thread::spawn(move || {
            let files = std::fs::OpenOptions::new()
                .write(true)
                .open(&a)
                .and_then(|w| std::fs::File::open(&b).map(|r| (w, r)));
            let _ = opened_tx.send(files);
        });
        let mut guard = KillOnDrop(Some(child));
        let (commands, answers_file) = opened_rx
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| {
                anyhow::anyhow!(
                    "chromium did not open its DevTools pipe within 30 s; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                )
            })?
            .context("opening the DevTools pipe")?;
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(answers_file);
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if message.last() == Some(&0) {
                            message.pop();
                        }
                        if let Ok(v) = serde_json::from_slice::<Value>(&message) {
                            if tx.send(v).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        let child = guard.0.take().expect("still held");
        let mut browser = Self { child, commands, answers, next_id: 0, session: String::new(), log };
        let target = browser.call("Target.createTarget", json!({ "url": "about:blank" }), false)?;
        let target_id = target["targetId"].as_str().context("no targetId")?.to_string();
        let attached = browser.call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
            false,
        )?;
        browser.session = attached["sessionId"].as_str().context("no sessionId")?.to_string();
        browser.page("Page.enable", json!({}))?;
        browser.page(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        Ok(browser)
    }

    /// Sends one command (to the page's session when `page`) and waits for its answer.
    fn call(&mut self, method: &str, params: Value, page: bool) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({ "id": id, "method": method, "params": params });
        if page {
            message["sessionId"] = json!(self.session);
        }
        let mut bytes = serde_json::to_vec(&message)?;
        bytes.push(0);
        self.commands.write_all(&bytes).with_context(|| format!("sending {method}"))?;
        let until = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let answer = self
                .answers
                .recv_timeout(left)
                .map_err(|_| anyhow::anyhow!("no answer to {method} within {COMMAND_TIMEOUT:?}"))?;
            // Events (no id) and answers to other sessions' commands are skipped.
            if answer["id"].as_u64() == Some(id) {
                if let Some(error) = answer.get("error") {
                    bail!("{method}: {error}");
                }
                return Ok(answer["result"].clone());
            }
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Result<Value> {
        self.call(method, params, true)
    }

    /// Starts loading `url` in the page.
    pub fn navigate(&mut self, url: &str) -> Result<()> {
        let r = self.page("Page.navigate", json!({ "url": url }))?;
        if let Some(error) = r.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {error}");
        }
        Ok(())
    }

    /// Evaluates a JavaScript expression in the page and returns its value.
    pub fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.page("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }))?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("`{expression}` threw: {e}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Waits until `expression` is true in the page (e.g. the document at a URL has loaded).
    pub fn wait_for(&mut self, expression: &str, within: Duration) -> Result<()> {
        let until = Instant::now() + within;
        loop {
            // A navigation may replace the context mid-call: an error is a "not yet".
            if matches!(self.eval(expression), Ok(Value::Bool(true))) {
                return Ok(());
            }
            if Instant::now() >= until {
                bail!("`{expression}` did not become true within {within:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The rendered document, serialized (what `--dump-dom` prints).
    pub fn dom(&mut self) -> Result<String> {
        let v = self.eval("document.documentElement.outerHTML")?;
        v.as_str().map(str::to_string).context("outerHTML is not a string")
    }

    /// A PNG screenshot of the whole page.
    pub fn screenshot(&mut self) -> Result<Vec<u8>> {
        use base64::Engine as _;
        let r =
            self.page("Page.captureScreenshot", json!({ "format": "png", "captureBeyondViewport": true }))?;
        let data = r["data"].as_str().context("no screenshot data")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(data)?)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills a child that start-up abandons.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
