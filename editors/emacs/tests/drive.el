;;; drive.el --- drive longllama.el with eglot in batch mode, for tests/test_editors.py -*- lexical-binding: t -*-
;; emacs --batch -L editors/emacs -l editors/emacs/tests/drive.el
;; $LONGLLAMA_DRIVE names a JSON file {cmd, settings, file, line, question, out};
;; results go to `out' as JSON: {steps, ghost, line, menu, answer, error}.

(require 'json)
(require 'longllama)

(let* ((cfg (json-read-file (getenv "LONGLLAMA_DRIVE")))
       (out (alist-get 'out cfg))
       (t0 (float-time))
       (result (list (cons 'steps nil))))
  (cl-flet ((step (name) (push (format "%s %.1fs" name (- (float-time) t0)) (alist-get 'steps result)))
            (put (key value) (push (cons key value) result)))
    (condition-case err
        (progn
          (setq longllama-server-command (append (alist-get 'cmd cfg) nil)
                longllama-settings (json-parse-string (json-encode (alist-get 'settings cfg))
                                                     :object-type 'plist :false-object :json-false :null-object nil)
                eglot-sync-connect t)
          (longllama-eglot-setup)
          (find-file (alist-get 'file cfg))
          (apply #'eglot (eglot--guess-contact))
          (step "connected")
          (put 'emacs emacs-version)
          (goto-char (point-min))
          (forward-line (1- (alist-get 'line cfg)))
          (end-of-line)
          (let ((before (thing-at-point 'line t)))
            (put 'ghost (longllama-complete))                 ; textDocument/inlineCompletion
            (put 'overlay (and longllama--overlay (overlay-get longllama--overlay 'after-string)))
            (step "ghost text")
            (longllama-accept)
            (put 'line (string-trim-right (thing-at-point 'line t)))
            (step "accepted")
            (delete-region (line-beginning-position) (line-end-position))
            (insert (string-trim-right before))
            (completion-at-point)                             ; eglot's capf: textDocument/completion
            (put 'menu (string-trim-right (thing-at-point 'line t)))
            (step "completion-at-point"))
          (put 'answer (longllama-ask (alist-get 'question cfg)))
          (put 'answer_buffer (with-current-buffer "*longllama-answer*" (buffer-string)))
          (step "answer"))
      (error (put 'error (error-message-string err))))
    (with-temp-file out (insert (json-encode result)))
    (kill-emacs 0)))
