//! What `tools.exec.security: "allowlist"` promises, as data shared by config validation
//! (`moltmate-config` refuses these programs in `safeBins`) and the exec policy
//! (`moltmate-sandbox` refuses them again at run time, whatever settings it is handed).
//!
//! **The promise.** Under `allowlist` a command can run only programs that cannot run other
//! programs and cannot write files: no shells, interpreters, wrappers (`env`, `xargs`,
//! `timeout`...), programs with a command escape (pagers, editors, `awk`, GNU `sed`, `find`,
//! `sort --compress-program`, `tar --to-command`, `git`...), and no program whose job is
//! writing, moving or deleting files. A program with one dangerous option or operand that is
//! worth keeping (`uniq`'s output file, `date --set`, `pdftotext`'s output file) is kept only
//! with its arguments vetted (`moltmate_sandbox::policy`).
//!
//! **How a name is matched.** By the name as written, lowercased, and by that name with any
//! version suffix removed (`python3.11` → `python`, `gcc-12` → `gcc`), and by each `-`-separated
//! part of it the same way (`x86_64-linux-gnu-gcc-12` → `gcc`, `ssh-keygen` → `ssh`). A false
//! match only refuses a program; it never allows one.
//!
//! **Known-safe first.** A known-bad table cannot be complete: the sandbox image alone has
//! `x86_64` (= `setarch`), `choom`, `pdb3`, `vim.basic`, `fallocate`, `mkfs.*`... So a name
//! is accepted in `safeBins` only when it is in [`VETTED_SAFE_BINS`] (programs this project has
//! checked: they read and print, nothing else) or when the operator vouches for it explicitly
//! in `tools.exec.vouchedBins` ([`safe_bin_verdict`]). The known-bad table ([`KNOWN`]) still
//! names why a program can never be allowed — not even vouched for — and is what the message
//! says. The default list ([`DEFAULT_SAFE_BINS`]) is part of the vetted table, with the
//! reasons in README.md.

/// The default `tools.exec.safeBins`: programs that only read files and print (see README.md,
/// "The allowlist", for why each is safe). `uniq`, `date` and `pdftotext` have their arguments
/// vetted by the exec policy.
pub const DEFAULT_SAFE_BINS: &[&str] = &[
    "cat",
    "head",
    "tail",
    "grep",
    "wc",
    "ls",
    "uniq",
    "cut",
    "tr",
    "pdftotext",
    "echo",
    "date",
];

/// Programs this project has checked to only read files (or nothing) and print: no option or
/// operand runs another program, writes, moves or deletes a file, or opens a connection
/// (`uniq`, `date` and `pdftotext` only with the argument vetting of the exec policy). A name
/// outside this table needs the operator's word (`tools.exec.vouchedBins`).
pub const VETTED_SAFE_BINS: &[&str] = &[
    // the defaults
    "cat",
    "head",
    "tail",
    "grep",
    "wc",
    "ls",
    "uniq",
    "cut",
    "tr",
    "pdftotext",
    "echo",
    "date",
    // text and data readers
    "jq",
    "nl",
    "tac",
    "rev",
    "paste",
    "join",
    "comm",
    "cmp",
    "diff",
    "fold",
    "fmt",
    "column",
    "od",
    "hexdump",
    "strings",
    "expand",
    "unexpand",
    "numfmt",
    "look",
    "tsort",
    "egrep",
    "fgrep",
    // checksums and encodings
    "md5sum",
    "sha1sum",
    "sha224sum",
    "sha256sum",
    "sha384sum",
    "sha512sum",
    "b2sum",
    "cksum",
    "sum",
    "base64",
    "base32",
    "basenc",
    // files and the system, read only
    "pdfinfo",
    "du",
    "df",
    "stat",
    "basename",
    "dirname",
    "realpath",
    "readlink",
    "pwd",
    "whoami",
    "id",
    "uname",
    "nproc",
    // arithmetic and constants
    "seq",
    "printf",
    "expr",
    "factor",
    "true",
    "false",
    "cal",
    "ncal",
];

const SHELL: &str = "is a shell: it runs any command";
const INTERPRETER: &str = "is a language interpreter: it runs any code, including other programs";
const WRAPPER: &str = "runs the program named in its arguments";
const AWK: &str = "runs other programs (system(), pipes to and from commands) and writes files";
const PAGER: &str = "is a pager with a command escape (`!command`)";
const EDITOR: &str = "is an editor: it runs commands (`:!command` and the like) and writes files";
const BUILTIN: &str =
    "is a shell builtin (pipelines run through /bin/sh, where it acts on the shell itself)";
const WRITER: &str = "writes, moves or deletes files";
const ARCHIVER: &str = "writes files and runs other programs (e.g. `tar --to-command`, `zip -TT`)";
const COMPRESSOR: &str = "writes and replaces files";
const NETWORK: &str = "opens network connections, writes files and can run commands";
const BUILD: &str = "compiles or builds and runs programs";
const PACKAGES: &str = "installs packages and runs their scripts";
const DEBUGGER: &str = "runs and controls other programs";
const VCS: &str = "runs other programs (hooks, pagers, `-c core.pager=...`, ssh) and writes files";
const ADMIN: &str = "administers the system or runs other programs";
const KILLER: &str = "sends signals to other processes";
const TYPESETTER: &str =
    "runs shell commands (`\\write18`, `%pipe%`, unsafe mode) and writes files";

/// Programs that can never be in `safeBins`, with why. See the module documentation.
const KNOWN: &[(&[&str], &str)] = &[
    (
        &[
            "sh", "bash", "rbash", "dash", "ash", "zsh", "ksh", "mksh", "pdksh", "oksh", "loksh",
            "yash", "posh", "fish", "csh", "tcsh", "rc", "es", "elvish", "nu", "nushell", "xonsh",
            "osh", "ysh", "busybox", "toybox",
        ],
        SHELL,
    ),
    (
        &[
            "python",
            "pypy",
            "ipython",
            "perl",
            "ruby",
            "irb",
            "node",
            "nodejs",
            "deno",
            "bun",
            "php",
            "lua",
            "luajit",
            "tclsh",
            "wish",
            "expect",
            "guile",
            "julia",
            "r",
            "rscript",
            "ghc",
            "ghci",
            "runghc",
            "runhaskell",
            "ocaml",
            "scala",
            "groovy",
            "java",
            "jshell",
            "jrunscript",
            "jjs",
            "pwsh",
            "powershell",
            "erl",
            "escript",
            "elixir",
            "iex",
            "racket",
            "sbcl",
            "clisp",
            "gforth",
            "octave",
            "qjs",
            "rhino",
            "swipl",
            "gnuplot",
            "m4",
            "dc",
            "mutool",
            "pandoc",
            "vd",
            "visidata",
            "sqlite",
            "csvtool",
        ],
        INTERPRETER,
    ),
    (
        &[
            "awk",
            "gawk",
            "mawk",
            "nawk",
            "original-awk",
            "goawk",
            "frawk",
        ],
        AWK,
    ),
    (
        &["sed"],
        "runs other programs (GNU `e` command, `s///e`) and writes files (`w`, `-i`)",
    ),
    (
        &["find"],
        "runs other programs (`-exec`, `-ok`) and writes or deletes files (`-fprintf`, `-delete`)",
    ),
    (
        &["sort"],
        "runs other programs (`--compress-program`) and writes files (`-o`, `-T`)",
    ),
    (
        &["split"],
        "runs other programs (`--filter`) and writes files",
    ),
    (
        &[
            "env",
            "xargs",
            "nice",
            "nohup",
            "timeout",
            "stdbuf",
            "setsid",
            "flock",
            "watch",
            "time",
            "ionice",
            "taskset",
            "chrt",
            "chroot",
            "unshare",
            "nsenter",
            "setpriv",
            "capsh",
            "prlimit",
            "setarch",
            "linux32",
            "linux64",
            "runcon",
            "sudo",
            "su",
            "doas",
            "pkexec",
            "runuser",
            "sg",
            "newgrp",
            "script",
            "unbuffer",
            "parallel",
            "run-parts",
            "start-stop-daemon",
            "systemd-run",
            "at",
            "batch",
            "crontab",
            "firejail",
            "bwrap",
            "proot",
            "fakeroot",
            "faketime",
            "numactl",
            "cgexec",
            "rlwrap",
            "sshpass",
            "daemonize",
            "catchsegv",
            "tmux",
            "screen",
            "byobu",
            "dtach",
            "ifne",
            "chronic",
            "pee",
            "lckdo",
            "mispipe",
            "zrun",
            "cpulimit",
            "nocache",
            "eatmydata",
            "torsocks",
            "proxychains",
            "ldd",
            "ld",
            "ld.so",
            "xdg-open",
            "run-mailcap",
            "see",
            "sensible-browser",
            "mail",
            "mailx",
            "mutt",
            "neomutt",
        ],
        WRAPPER,
    ),
    (
        &[
            "less",
            "more",
            "most",
            "pg",
            "pager",
            "sensible-pager",
            "man",
            "info",
            "pinfo",
        ],
        PAGER,
    ),
    (
        &[
            "vi",
            "vim",
            "nvim",
            "gvim",
            "view",
            "rview",
            "rvim",
            "vimdiff",
            "vimtutor",
            "ex",
            "ed",
            "red",
            "emacs",
            "nano",
            "rnano",
            "pico",
            "joe",
            "jed",
            "mcedit",
            "micro",
            "hx",
            "kak",
            "editor",
            "sensible-editor",
            "select-editor",
            "vipe",
            "edit",
        ],
        EDITOR,
    ),
    (
        &[
            "exec",
            "eval",
            "command",
            "builtin",
            ".",
            "source",
            "trap",
            "alias",
            "unalias",
            "cd",
            "set",
            "unset",
            "export",
            "readonly",
            "local",
            "read",
            "ulimit",
            "umask",
            "wait",
            "fc",
            "hash",
            "type",
            "getopts",
            "shift",
            "return",
            "exit",
            "break",
            "continue",
            "times",
            "jobs",
            "fg",
            "bg",
            "let",
            "declare",
            "typeset",
            "enable",
            "mapfile",
            "readarray",
            "coproc",
            "disown",
            "suspend",
            "shopt",
            "history",
            "compgen",
            "complete",
            "pushd",
            "popd",
            "dirs",
        ],
        BUILTIN,
    ),
    (&["kill", "pkill", "killall", "skill", "snice"], KILLER),
    (
        &[
            "tee",
            "dd",
            "cp",
            "mv",
            "rm",
            "ln",
            "link",
            "unlink",
            "install",
            "mkdir",
            "rmdir",
            "touch",
            "chmod",
            "chown",
            "chgrp",
            "chattr",
            "truncate",
            "shred",
            "mkfifo",
            "mknod",
            "mktemp",
            "csplit",
            "patch",
            "sponge",
            "logsave",
            "rename",
            "qpdf",
            "pdftk",
            "pdfseparate",
            "pdfunite",
            "pdftoppm",
            "pdfimages",
            "pdftocairo",
            "pdftohtml",
            "pdfdetach",
            "pdfattach",
            "ffmpeg",
            "exiftool",
            "yq",
        ],
        WRITER,
    ),
    (&["iconv", "shuf"], "writes files (`-o`, `--output`)"),
    (
        &["ptx", "xxd"],
        "writes files (a second file operand is its output)",
    ),
    (&["file"], "writes files (`-C` compiles a magic file)"),
    (
        &[
            "tar", "zip", "unzip", "7z", "7za", "7zr", "rar", "unrar", "cpio", "ar", "pax",
            "bsdtar", "jar",
        ],
        ARCHIVER,
    ),
    (
        &[
            "gzip",
            "gunzip",
            "bzip2",
            "bunzip2",
            "xz",
            "unxz",
            "lzma",
            "unlzma",
            "zstd",
            "unzstd",
            "lz4",
            "lzip",
            "compress",
            "uncompress",
            "pigz",
            "pbzip2",
        ],
        COMPRESSOR,
    ),
    (
        &[
            "curl",
            "wget",
            "nc",
            "ncat",
            "netcat",
            "socat",
            "telnet",
            "ftp",
            "tftp",
            "lftp",
            "ssh",
            "scp",
            "sftp",
            "rsync",
            "aria2c",
            "nmap",
            "tcpdump",
            "openssl",
            "gpg",
            "gpg2",
            "openvpn",
            "psql",
            "mysql",
            "redis-cli",
        ],
        NETWORK,
    ),
    (
        &[
            "make", "gmake", "cmake", "ninja", "meson", "gcc", "cc", "g++", "c++", "clang",
            "clang++", "tcc", "as", "rustc", "cargo", "go", "javac", "ghc",
        ],
        BUILD,
    ),
    (
        &[
            "pip", "pipx", "npm", "npx", "yarn", "pnpm", "gem", "bundle", "cpan", "cpanm",
            "composer", "apt", "apt-get", "dpkg", "rpm", "yum", "dnf", "apk", "snap", "flatpak",
        ],
        PACKAGES,
    ),
    (
        &[
            "gdb",
            "gdbserver",
            "lldb",
            "strace",
            "ltrace",
            "valgrind",
            "perf",
            "bpftrace",
        ],
        DEBUGGER,
    ),
    (&["git", "hg", "svn", "bzr", "fossil", "darcs"], VCS),
    (
        &[
            "mount",
            "umount",
            "losetup",
            "ip",
            "iptables",
            "nft",
            "sysctl",
            "modprobe",
            "insmod",
            "docker",
            "podman",
            "kubectl",
            "systemctl",
            "journalctl",
            "service",
            "loginctl",
            "busctl",
            "dbus-send",
        ],
        ADMIN,
    ),
    (
        &[
            "tex",
            "latex",
            "pdflatex",
            "xelatex",
            "lualatex",
            "luatex",
            "pdftex",
            "dvips",
            "gs",
            "ghostscript",
            "groff",
            "troff",
            "nroff",
            "soffice",
            "libreoffice",
        ],
        TYPESETTER,
    ),
    (
        &[
            "fd",
            "fdfind",
            "fzf",
            "entr",
            "logrotate",
            "sdiff",
            "diff3",
            "a2ps",
            "enscript",
        ],
        WRAPPER,
    ),
    (&["rg", "ripgrep"], "runs other programs (`--pre`)"),
    (&["bat", "batcat"], PAGER),
    (
        &[
            "tree",
            "xmllint",
            "tidy",
            "age",
            "qrencode",
            "wkhtmltopdf",
            "setfacl",
        ],
        "writes files (`-o`, `--output`)",
    ),
    (
        &["dos2unix", "unix2dos", "mac2unix", "unix2mac", "recode"],
        "rewrites files in place",
    ),
    (&["cabextract"], WRITER),
    (
        &[
            "convert",
            "magick",
            "mogrify",
            "identify",
            "montage",
            "composite",
        ],
        "writes files and runs helper programs (ImageMagick delegates)",
    ),
    (&["smbclient", "w3m", "lynx", "links", "elinks"], NETWORK),
    (&["systemd-nspawn"], ADMIN),
    (&["pdfjam"], TYPESETTER),
    // Found in the sandbox image (`ls /usr/bin /usr/sbin` of moltmate-sandbox:bookworm-slim)
    // by the review of issue 9, and their kind.
    (
        &[
            // setarch under its architecture names: `x86_64 sh -c id`
            "i386",
            "i486",
            "i586",
            "i686",
            "x86_64",
            "x86-64",
            "amd64",
            "arm",
            "armv7l",
            "armh",
            "aarch64",
            "arm64",
            "ppc",
            "ppc32",
            "ppc64",
            "ppc64le",
            "sparc",
            "sparc32",
            "sparc64",
            "s390",
            "s390x",
            "mips",
            "mips32",
            "mips64",
            "parisc",
            "parisc32",
            "parisc64",
            "ia64",
            "alpha",
            "uname26",
            // util-linux and friends that run the command in their arguments
            "choom",
            "uclampset",
            "scriptlive",
            "scriptreplay",
            "debconf",
            "dpkg-reconfigure",
            "vipw",
            "vigr",
            "c_rehash",
            "zcmp",
            "zdiff",
            "zgrep",
            "zegrep",
            "zfgrep",
            "zless",
            "zmore",
            "lesspipe",
            "lessfile",
            "mesg",
            "ulimit",
        ],
        WRAPPER,
    ),
    (
        &[
            "pdb",
            "pydoc",
            "py3compile",
            "py3clean",
            "pycompile",
            "pyclean",
            "python-config",
        ],
        "runs Python code (its own or the file named), and writes files",
    ),
    (
        &[
            "fallocate",
            "hardlink",
            "tempfile",
            "savelog",
            "gzexe",
            "znew",
            "zforce",
            "rmt",
            "tic",
            "zic",
            "mke2fs",
            "mkfs",
            "mkswap",
            "mkdosfs",
            "mkfs.ext4",
            "debugfs",
            "e2image",
            "e2fsck",
            "fsck",
            "tune2fs",
            "resize2fs",
            "e2label",
            "e2undo",
            "e4defrag",
            "wipefs",
            "fdisk",
            "sfdisk",
            "cfdisk",
            "sgdisk",
            "parted",
            "blkdiscard",
            "swapon",
            "swapoff",
            "ucf",
            "ucfr",
            "update-alternatives",
            "install-info",
            "ldconfig",
            "locale-gen",
            "useradd",
            "usermod",
            "userdel",
            "adduser",
            "deluser",
            "addgroup",
            "delgroup",
            "groupadd",
            "groupmod",
            "groupdel",
            "passwd",
            "chpasswd",
            "chfn",
            "chsh",
            "gpasswd",
            "newusers",
            "pwck",
            "grpck",
            "pwconv",
            "pwunconv",
            "grpconv",
            "grpunconv",
            "cpgr",
            "cppw",
            "split-logfile",
            "mcookie",
        ],
        WRITER,
    ),
];

/// Why `name` can never be allowlisted, or `None` when it is not a known program runner or
/// writer. `name` is a bare program name as written in `safeBins`. Matched by the whole name,
/// without its version suffix, and by each part between `-` and `.` (`vim.basic` → `vim`,
/// `mkfs.ext4` → `mkfs`, `rename.ul` → `rename`).
pub fn refused_safe_bin(name: &str) -> Option<&'static str> {
    let lower = name.to_ascii_lowercase();
    let base = strip_version(&lower);
    let mut candidates: Vec<&str> = vec![lower.as_str(), base];
    candidates.extend(base.split(['-', '.']).map(strip_version));
    candidates
        .into_iter()
        .filter(|c| !c.is_empty())
        .find_map(|c| {
            KNOWN
                .iter()
                .find(|(names, _)| names.contains(&c))
                .map(|(_, why)| *why)
        })
}

/// Whether `name` may be in `safeBins`: `Err(reason)` for a known runner or writer (whatever
/// `vouched` says) and for a name that is neither vetted by this project
/// ([`VETTED_SAFE_BINS`]) nor vouched for by the operator (`tools.exec.vouchedBins`).
/// Config validation and the exec policy both ask this.
pub fn safe_bin_verdict(name: &str, vouched: &[String]) -> Result<(), String> {
    if let Some(why) = refused_safe_bin(name) {
        return Err(why.to_string());
    }
    if VETTED_SAFE_BINS.contains(&name) || vouched.iter().any(|v| v == name) {
        return Ok(());
    }
    Err(NOT_VETTED.to_string())
}

/// Why an unknown name is refused (config and policy messages build on it).
pub const NOT_VETTED: &str = "is not a program this project has vetted for the allowlist; if you have checked that no option or operand of it runs another program or writes a file, list it in tools.exec.vouchedBins as well";

/// `python3.11` → `python`, `gcc-12` → `gcc`, `ksh93` → `ksh`; a name that is all version
/// (`7`) stays as it is.
fn strip_version(name: &str) -> &str {
    let stripped =
        name.trim_end_matches(|c: char| c.is_ascii_digit() || c == '.' || c == '_' || c == '-');
    if stripped.is_empty() {
        name
    } else {
        stripped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_list_holds_no_known_runner() {
        for bin in DEFAULT_SAFE_BINS {
            assert_eq!(refused_safe_bin(bin), None, "{bin}");
            assert_eq!(safe_bin_verdict(bin, &[]), Ok(()), "{bin}");
        }
    }

    #[test]
    fn the_vetted_table_holds_no_known_runner() {
        for bin in VETTED_SAFE_BINS {
            assert_eq!(refused_safe_bin(bin), None, "{bin}");
        }
    }

    #[test]
    fn unknown_names_need_the_operators_word_and_runners_never_pass() {
        assert!(safe_bin_verdict("mytool", &[])
            .unwrap_err()
            .contains("vouchedBins"));
        assert_eq!(safe_bin_verdict("mytool", &["mytool".into()]), Ok(()));
        assert!(safe_bin_verdict("x86_64", &["x86_64".into()]).is_err());
        assert!(safe_bin_verdict("vim.basic", &["vim.basic".into()]).is_err());
    }

    #[test]
    fn runners_are_found_by_name_version_and_part() {
        for (name, needle) in [
            ("awk", "system()"),
            ("gawk", "system()"),
            ("sed", "`e` command"),
            ("find", "-exec"),
            ("sort", "--compress-program"),
            ("sh", "shell"),
            ("bash", "shell"),
            ("busybox", "shell"),
            ("python3", "interpreter"),
            ("python3.11", "interpreter"),
            ("Python3", "interpreter"),
            ("perl5.36", "interpreter"),
            ("lua5.4", "interpreter"),
            ("tclsh8.6", "interpreter"),
            ("ksh93", "shell"),
            ("gcc-12", "builds"),
            ("x86_64-linux-gnu-gcc-12", "builds"),
            ("ssh-keygen", "network"),
            ("env", "program named"),
            ("xargs", "program named"),
            ("timeout", "program named"),
            ("less", "pager"),
            ("vim", "editor"),
            ("tee", "writes"),
            ("dd", "writes"),
            ("tar", "tar --to-command"),
            ("git", "hooks"),
            ("eval", "builtin"),
            (".", "builtin"),
            ("kill", "signals"),
            ("rg", "--pre"),
            ("tree", "-o"),
            ("dos2unix", "in place"),
        ] {
            let why = refused_safe_bin(name).unwrap_or_else(|| panic!("{name} not refused"));
            assert!(why.contains(needle), "{name}: {why}");
        }
    }

    #[test]
    fn ordinary_readers_are_not_refused() {
        for name in [
            "cat",
            "jq",
            "sha256sum",
            "md5sum",
            "base64",
            "nl",
            "tac",
            "rev",
            "paste",
            "join",
            "comm",
            "cmp",
            "diff",
            "fold",
            "fmt",
            "column",
            "od",
            "strings",
            "pdfinfo",
            "du",
            "stat",
            "basename",
            "seq",
            "printf",
            "true",
        ] {
            assert_eq!(refused_safe_bin(name), None, "{name}");
        }
    }
}
