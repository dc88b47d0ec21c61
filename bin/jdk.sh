# Sourced by bin/qdedup and bin/test: sets QDEDUP_JAVA_HOME to a JDK >= 25 (JAVA_HOME first, then /usr/lib/jvm/*).
qdedup_java_major() { # sets QDEDUP_JAVA_MAJOR (no subshell: each fork costs start-up time)
  local v="" line
  # The JDK's release file says its version without starting a JVM (read with builtins: every fork of sed or head
  # costs milliseconds at each start, more when the page cache is cold); ask the JVM only when it is missing.
  if [ -r "$1/release" ]; then
    while IFS= read -r line || [ -n "$line" ]; do
      if [[ $line =~ ^JAVA_VERSION=\"([0-9]+) ]]; then v=${BASH_REMATCH[1]}; break; fi
    done <"$1/release"
  fi
  if [ -z "$v" ]; then
    v=$("$1/bin/java" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p' | head -n1)
  fi
  QDEDUP_JAVA_MAJOR=${v%%.*}
}
qdedup_find_jdk() {
  local c
  for c in ${JAVA_HOME:+"$JAVA_HOME"} /usr/lib/jvm/*; do
    [ -x "$c/bin/java" ] && [ -x "$c/bin/javac" ] || continue
    qdedup_java_major "$c"
    if [ -n "$QDEDUP_JAVA_MAJOR" ] && [ "$QDEDUP_JAVA_MAJOR" -ge 25 ] 2>/dev/null; then QDEDUP_JAVA_HOME=$c; return 0; fi
  done
  echo "qdedup: no JDK >= 25 found (looked at JAVA_HOME and /usr/lib/jvm/*); install one, e.g. temurin-25-jdk, and set JAVA_HOME" >&2
  return 1
}
